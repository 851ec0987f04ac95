"""Train the adapters that join an encoder to the frozen LM: ``python train_adapter.py --modality image``.

Everything lives in :mod:`mm_llama.training.run`; this script only calls it.
The last line of stdout is the run's ``metrics.json`` as one JSON object.
"""

from mm_llama.training.run import main

if __name__ == "__main__":
    raise SystemExit(main())
