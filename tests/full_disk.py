"""A full disk for a child process, without mocks: RLIMIT_FSIZE makes the kernel refuse every
write past a size with EFBIG ("File too large"), which tcore meets where it would meet ENOSPC."""
import resource
import signal


def file_size_limit(limit: int):
    """`preexec_fn` for subprocess: writes past `limit` bytes fail with EFBIG (SIGXFSZ is
    ignored, so the write returns the error instead of killing the process)."""
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply
