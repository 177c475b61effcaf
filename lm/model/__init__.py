"""The model: the decoder-only transformer (`transformer`), its attention kernels
(`attention`), the logical-axis sharding rules and meshes (`sharding`), LoRA adapters
(`lora`) and named model sizes (`sizes`). Pure functions of parameters; nothing here knows
about training, data or stages."""
