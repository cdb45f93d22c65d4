# Iteration 0: starting data, pre-training by example, initial CG points (literal iter_000 paths).


rule start:
    input:
        cfg=config_snapshot,
    output:
        "results/{campaign}/iter_000/start.h5",
    log:
        "results/{campaign}/logs/start/iter_000.log",
    benchmark:
        "results/{campaign}/benchmarks/start/iter_000.tsv"
    conda:
        "../../envs/cgflow.yaml"
    resources:
        runtime=120,
        mem_mb=4000,
    shell:
        "cgflow wf start --config {input.cfg} --out {output} > {log} 2>&1"


rule pretrain:
    input:
        cfg=config_snapshot,
        start="results/{campaign}/iter_000/start.h5",
    output:
        "results/{campaign}/iter_000/flow.pt",
    log:
        "results/{campaign}/logs/pretrain/iter_000.log",
    benchmark:
        "results/{campaign}/benchmarks/pretrain/iter_000.tsv"
    conda:
        "../../envs/cgflow.yaml"
    resources:
        runtime=120,
        mem_mb=4000,
    shell:
        "cgflow wf pretrain --config {input.cfg} --start {input.start} --out {output}"
        " > {log} 2>&1"


rule initial_points:
    input:
        cfg=config_snapshot,
        start="results/{campaign}/iter_000/start.h5",
    output:
        "results/{campaign}/iter_000/points.h5",
    log:
        "results/{campaign}/logs/initial_points/iter_000.log",
    benchmark:
        "results/{campaign}/benchmarks/initial_points/iter_000.tsv"
    run:
        cgflow_step(
            log,
            "initial-points --config {input.cfg} --start {input.start} --out {output}",
        )
