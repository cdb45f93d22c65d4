# CG walkers on the ensemble of iteration k, the next CG points, and the convergence decision.
# The checkpoint `check` is read only by the aggregator (common.smk: last_iteration); keep it
# out of any group.


rule walkers:
    input:
        cfg=config_snapshot,
        ensemble="results/{campaign}/iter_{iteration}/ensemble.pt",
        points=previous("points.h5"),
        start="results/{campaign}/iter_000/start.h5",
    output:
        "results/{campaign}/iter_{iteration}/walkers.h5",
    log:
        "results/{campaign}/logs/walkers/iter_{iteration}.log",
    benchmark:
        "results/{campaign}/benchmarks/walkers/iter_{iteration}.tsv"
    params:
        k=iteration,
    run:
        cgflow_step(
            log,
            "walkers --config {input.cfg} --iteration {params.k}"
            " --ensemble {input.ensemble} --points {input.points} --start {input.start}"
            " --out {output}",
        )


rule select:
    input:
        cfg=config_snapshot,
        walkers="results/{campaign}/iter_{iteration}/walkers.h5",
        points=previous("points.h5"),
    output:
        "results/{campaign}/iter_{iteration}/points.h5",
    log:
        "results/{campaign}/logs/select/iter_{iteration}.log",
    benchmark:
        "results/{campaign}/benchmarks/select/iter_{iteration}.tsv"
    params:
        k=iteration,
    run:
        cgflow_step(
            log,
            "select --config {input.cfg} --iteration {params.k}"
            " --walkers {input.walkers} --points {input.points} --out {output}",
        )


checkpoint check:
    input:
        walkers="results/{campaign}/iter_{iteration}/walkers.h5",
        metrics="results/{campaign}/iter_{iteration}/metrics.json",
    output:
        status="results/{campaign}/iter_{iteration}/status.json",
    log:
        "results/{campaign}/logs/check/iter_{iteration}.log",
    benchmark:
        "results/{campaign}/benchmarks/check/iter_{iteration}.tsv"
    params:
        k=iteration,
        stop=stop_options,
    run:
        cgflow_step(
            log,
            "check --iteration {params.k} {params.stop}"
            " --walkers {input.walkers} --metrics {input.metrics} --out {output.status}",
        )
