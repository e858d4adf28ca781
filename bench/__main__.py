"""Every benchmark of the project, then one table of ratios; or one benchmark by name.

    python -m bench [--quick]          (make bench)
    python -m bench scale|kd|gpu|loader [...] the scale rehearsal, the chunked KD loss, the GPU check, the loader
    python -m bench cache [--quick]    the teacher cache: bytes per token, build cost, a KD sweep online vs cached
    python -m bench kd-topk [--quick]  top-k KD (tail and renormalised forms) against full-vocabulary KD
    python -m bench faults             the "Faults survived" table from the last test run
    python -m bench profile [...]      where a step's time goes, by phase and kind (torch.profiler)

prep (ted-prep vs the HF run_clm recipe and the bare tokenizer), engine (TED step overhead, teacher
placements), loader (data path vs training consumption), scaling (on paper, from the measured
overhead), cache (the teacher cache). The reproduction study is separate: python bench/repro.py (55 min on 2 cores).
"""

import sys

from bench import (
    cache_bench,
    engine_bench,
    faults,
    gpu_check,
    kd_bench,
    kd_topk_bench,
    loader_bench,
    prep_bench,
    profile_bench,
    scale_bench,
    scaling,
)

BY_NAME = {"scale": scale_bench.main, "kd": kd_bench.main, "gpu": gpu_check.main, "loader": loader_bench.main,
           "faults": faults.main, "profile": profile_bench.main, "cache": cache_bench.main,
           "kd-topk": kd_topk_bench.main}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in BY_NAME:
        BY_NAME[sys.argv[1]](sys.argv[2:])
        return
    quick = "--quick" in sys.argv
    prep = prep_bench.run(quick=quick)
    print(prep_bench.table(prep))
    engine = engine_bench.main(["--quick"] if quick else [])
    loader = loader_bench.main(["--quick"] if quick else [])
    scaling.main([])
    cache = cache_bench.main(["--quick"] if quick else [])
    p = engine["placements"]
    rows = [("ted-prep tokens/s vs HF run_clm", prep["ratios"]["tedprep_vs_hf_tokens_per_s"], ">= 1.3"),
            ("ted-prep tokens/s vs bare tokenizer", prep["ratios"]["tedprep_vs_bare_tokens_per_s"], ">= 0.9"),
            ("ted-prep peak RSS, 10x corpus vs 1x", prep["ratios"]["tedprep_peak_rss_nx_vs_1x"], "~1"),
            ("TED step / (LM step + teacher fwd)", engine["overhead"]["ratio"], "<= 1.10"),
            ("pipeline / replicated teacher params per rank @2",
             p["pipeline@2"]["teacher_params_per_rank_max"] / p["replicated@2"]["teacher_params_per_rank_max"],
             "<= 0.6"),
            ("pipeline / replicated step time @2", p["pipeline@2"]["step_s"] / p["replicated@2"]["step_s"], "<= 1.5"),
            ("loader / training tokens/s per rank", loader["ratio"], ">> 1"),
            ("3-source blend / one source loader samples/s", loader["blend"]["blend"]["vs_one_source"], ">= 0.9"),
            ("blend + document mask / one source samples/s", loader["blend"]["blend_document_mask"]["vs_one_source"],
             ">= 0.9"),
            ("blend + document mask data time / engine step",
             loader["blend"]["blend_document_mask"]["data_vs_step"], "<= 0.02"),
            ("teacher cache bytes/token at k=64 (bound, 17-bit ids)", cache["bytes_per_token"][64]["bound_17bit"],
             "<= 200"),
            ("cache build / teacher forward alone (throughput)", cache["build_vs_forward"], ">= 0.9"),
            ("5 KD students: online / cached wall time", cache["sweep_online_vs_cached"], "> 1")]
    print(f"\n{'ratio':<52}{'measured':>10}   goal")
    for name, value, goal in rows:
        print(f"{name:<52}{value:>10.2f}   {goal}")


main()
