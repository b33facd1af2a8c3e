"""The base model, above core and below the methods: what is done to a model before or
regardless of any adapter.

`loading` loads models and tokenizers (hub ids, folders, embedded packages); `quant` the 4-bit
base of QLoRA; `losses` the memory-flat losses; `packed_attention` whether packed rows are exact
on a model; `trim` and `compile` the speed levers the training loop pulls once.
"""
