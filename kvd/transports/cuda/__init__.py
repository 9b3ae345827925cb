"""The CUDA IPC transport: driver bindings (driver.py), the gather/scatter kernels (kernels.py), each GPU's engine
thread with its resources and copy jobs (device.py, resources.py) and the Transport the router registers
(transport.py). Importing this package needs nothing; using it needs CuPy and a CUDA device."""
