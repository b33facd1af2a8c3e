"""What methods share and the rest of peftcli relies on, without knowing any method by name.

`adapter` is the contract every adapter module keeps; `hf_call` reads and rewrites the calls HF
models make (backbone arguments, sub-layer inputs, the batch's attention mask).
"""
