"""engine=megatron: Megatron-core GPTModel (tensor / pipeline parallel) built from HF Llama-family decoders.

`convert`: HF <-> Megatron weights and configs (pure tensor slicing, exact). `model`: process groups, build, load,
forward, 1F1B pipeline schedule, HF export. Needs the optional extra: pip install -e '.[megatron]'.
"""
