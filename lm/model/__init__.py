"""The model: the decoder-only transformer (`transformer`), its attention kernels
(`attention`; on a CPU `attention_cpu`, a native kernel), the logical-axis sharding rules and
meshes (`sharding`), LoRA adapters (`lora`), named model sizes (`sizes`) and the builder of
native CPU kernels (`native`, also used by lm.sampling's int8 product). Pure functions of
parameters; nothing here knows about training, data or stages."""
