"""The bottom layer: helpers every other part of peftcli may use and that use nothing above them.

Methods, the training loop and the commands import from here; nothing here imports a method, the
run loader or a command, so this package can never close an import circle.

`arch` is THE architecture map; `errors` the one exit-2 base class; `adapter` is the contract
every adapter module keeps; `hf_call` reads and rewrites the calls HF models make (backbone
arguments, sub-layer inputs, the batch's attention mask); `precision` the autocast and
forward-input rules; `switch` the adapter on/off switch; `peft_layout` the helpers of HF PEFT's
key layout; `adapter_merging` the rules that combine adapters; `faults` the kill and raise points
of the tests; `quiet` quiets other libraries around loading calls; `threads` the CPU thread count
for training on a shared machine.
"""
