"""Where the time of an INT8 prefill goes: torch.profiler over one 16 x 128 prefill of an int8 export.

    python benchmarks/int8_profile.py [--model runs/bench/quantize/teacher/int8] [--rows 18]

(the export is the one benchmarks/quantize.py writes). Prints the operators by self CPU time.
"""

from __future__ import annotations

import argparse

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="runs/bench/quantize/teacher/int8")
    ap.add_argument("--rows", type=int, default=18)
    args = ap.parse_args()

    from slimlm.loading import load_model

    torch.set_num_threads(2)
    model = load_model(args.model)
    batch = torch.randint(100, 40000, (16, 128), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        model.get_decoder()(input_ids=batch, use_cache=False)  # warm-up
        with torch.profiler.profile() as prof:
            model.get_decoder()(input_ids=batch, use_cache=False)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
