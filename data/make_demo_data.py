"""Write the bundled demo data set into data/demo/ (deterministic: same bytes every run).

    python data/make_demo_data.py
    python data/make_demo_data.py --out DIR --train 300 --val 50 --seed 0

The generator is :mod:`visionzip_core.testing.demo_data`.
"""

from pathlib import Path

from visionzip_core.testing.demo_data import main

if __name__ == "__main__":
    main(default_out=str(Path(__file__).resolve().parent / "demo"))
