"""Device profiles and a roofline latency / memory simulator for phones (``edge-mllm simulate``).

- :mod:`.profiles` (+ ``devices.json``): phones, the Jetson and the measured host;
- :mod:`.shapes`: a model's weights, FLOPs and cache sizes; :mod:`.formats`: bits per weight;
- :mod:`.backends`: runtimes and their calibrated efficiency factors;
- :mod:`.predict`: the roofline model; :mod:`.inputs`: bundles and HF configs as inputs.
"""
