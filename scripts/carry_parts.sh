#!/usr/bin/env bash
# scripts/carry_parts.sh: send wheels larger than one device call carries (64 MiB, the
# working tree included) to the GPU machine in parts, over consecutive calls.
#
# Here (with PyPI):
#   scripts/carry_parts.sh split WHEEL...   # -> .carry/p01, .carry/p02, ... (ignored folders)
# On the GPU machine, one call per part, each carrying its folder (carry: [".carry/pNN"]):
#   scripts/carry_parts.sh stash            # copies the part that arrived to $PARTS
#   scripts/carry_parts.sh join             # last call: rebuild the wheels in $WHEELS, checked
# scripts/gpu_check.sh installs the wheels it finds in $WHEELS (default /tmp/tcore_wheels).
#
# The machine keeps /tmp while it stays warm (30 s after a call), so the calls must follow
# each other at once. Every part folder holds the manifest (sha256 and part count of each
# wheel), so `join` can say which part is missing.
#
# Settings (environment): CARRY_PART_MIB (part size, default 56: the tree itself travels
# too), PARTS (default /tmp/tcore_parts), WHEELS (default /tmp/tcore_wheels).
set -euo pipefail
cd "$(dirname "$0")/.."
PART_MIB=${CARRY_PART_MIB:-56}
PARTS=${PARTS:-/tmp/tcore_parts}
WHEELS=${WHEELS:-/tmp/tcore_wheels}

die() { echo "carry_parts: $*" >&2; exit 1; }

split_wheels() {
    (($#)) || die "split needs the wheel files to send"
    rm -rf .carry/p[0-9]*
    local staging
    staging=$(mktemp -d)
    : >"$staging/MANIFEST"
    for wheel in "$@"; do
        [[ -f "$wheel" ]] || die "$wheel: no such file"
        local name
        name=$(basename "$wheel")
        split -b "${PART_MIB}M" -d -a 3 "$wheel" "$staging/$name.part"
        local count
        count=$(find "$staging" -name "$name.part*" | wc -l)
        echo "$(sha256sum "$wheel" | cut -d' ' -f1) $count $name" >>"$staging/MANIFEST"
    done
    # Pack the chunks into folders of at most PART_MIB each, in order.
    local folder=0 used=$((PART_MIB * 1048576)) limit=$((PART_MIB * 1048576))
    for chunk in $(cd "$staging" && ls -- *.part* | sort); do
        local size
        size=$(stat -c %s "$staging/$chunk")
        if ((used + size > limit)); then
            folder=$((folder + 1))
            used=0
            mkdir -p ".carry/p$(printf %02d "$folder")"
            cp "$staging/MANIFEST" ".carry/p$(printf %02d "$folder")/"
        fi
        mv "$staging/$chunk" ".carry/p$(printf %02d "$folder")/"
        used=$((used + size))
    done
    rm -rf "$staging"
    echo "$folder device calls, one per folder, back to back:"
    for dir in .carry/p[0-9]*; do echo "  carry [\"$dir\"]  ($(du -sh "$dir" | cut -f1))"; done
}

stash() {
    mkdir -p "$PARTS"
    local found=0
    shopt -s nullglob
    for dir in .carry/p[0-9]*; do
        cp "$dir"/* "$PARTS"/
        found=1
        echo "stashed $dir: $(ls "$dir" | grep -c part) chunks"
    done
    ((found)) || die "no .carry/pNN folder arrived with this call"
}

join_wheels() {
    [[ -f "$PARTS/MANIFEST" ]] || die "$PARTS/MANIFEST missing: stash at least one part first"
    mkdir -p "$WHEELS"
    local failed=0
    while read -r sha count name; do
        local chunks=()
        for ((k = 0; k < count; k++)); do
            local chunk
            chunk="$PARTS/$name.part$(printf %03d "$k")"
            if [[ ! -f "$chunk" ]]; then
                echo "carry_parts: $name: part $k of $count missing ($chunk)" >&2
                failed=1
                continue 2
            fi
            chunks+=("$chunk")
        done
        cat "${chunks[@]}" >"$WHEELS/$name.tmp"
        if [[ "$(sha256sum "$WHEELS/$name.tmp" | cut -d' ' -f1)" != "$sha" ]]; then
            echo "carry_parts: $name: sha256 mismatch after joining $count parts" >&2
            rm -f "$WHEELS/$name.tmp"
            failed=1
            continue
        fi
        mv "$WHEELS/$name.tmp" "$WHEELS/$name"
        echo "joined $name ($count parts, sha256 ok)"
    done <"$PARTS/MANIFEST"
    return "$failed"
}

case "${1:-}" in
    split) shift; split_wheels "$@" ;;
    stash) stash ;;
    join) join_wheels ;;
    *) die "usage: scripts/carry_parts.sh split WHEEL... | stash | join" ;;
esac
