"""Energy of a span of work, measured where the hardware reports it (NVML, Jetson power
rails, RAPL), modelled (and labelled so) where nothing is readable. `detect_meter` picks."""
