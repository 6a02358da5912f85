"""The ``onednn`` backend: CPU schedules of their own (MKL GEMMs and oneDNN convolutions on
channels-last tensors), chosen for CPU speed; one module per op that has one (today the Patch
Detailer Head). Never picked by auto: the reference stays the ground truth on CPU tensors."""
