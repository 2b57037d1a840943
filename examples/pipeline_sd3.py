"""Tiny sd3 pipeline, transformer and VAE decoder compiled with backend "xdit" (see pipeline_common.py).

    torchrun --nproc-per-node 2 examples/pipeline_sd3.py --ulysses 2
"""

from pipeline_common import main

if __name__ == "__main__":
    main("sd3")
