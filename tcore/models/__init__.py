"""Networks of T-CoRe: ViT backbone, DINO head, Patch Matching Module, reference checkpoints."""
from tcore.models.attention import BACKENDS, Attention, MultiheadAttention, set_attention_backend
from tcore.models.head import DINOHead
from tcore.models.pmm import PatchMatchingModule
from tcore.models.reference import (CheckpointError, ReferenceModel, export_reference,
                                    export_safetensors, load_reference)
from tcore.models.vit import ARCHS, Backbone, build_backbone

__all__ = ["ARCHS", "BACKENDS", "Attention", "Backbone", "CheckpointError", "DINOHead",
           "MultiheadAttention", "PatchMatchingModule", "ReferenceModel", "build_backbone",
           "export_reference", "export_safetensors", "load_reference", "set_attention_backend"]
