"""Hugging Face interop: import local transformers checkpoints into Tessera models and export
Tessera checkpoints as folders transformers loads without custom code.

    load_hf(path)                  a Hugging Face folder → ImportedModel (model, tokenizer, meta)
    import_hf(src, out)            the same, written as a Tessera checkpoint
    export_hf(checkpoint, out)     a Tessera checkpoint → a Hugging Face folder

Key and config translation lives in `hf_keys`, tokenizers and chat templates in `hf_tokenizer`.
"""

from tessera.interop.hf_export import export_hf
from tessera.interop.hf_import import HFImportError, ImportedModel, import_hf, load_hf

__all__ = ["HFImportError", "ImportedModel", "export_hf", "import_hf", "load_hf"]
