"""Other formats: the Hugging Face Llama layout both ways (`hf`: `export_llama`,
`import_llama`, safetensors, tokenizer files), without torch. Run directories are
converted by `lm.tools.hf_runs` (`lm export-hf`, `lm import-hf`)."""
