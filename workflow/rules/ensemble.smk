# Free-energy ensemble fitted to the labels of iteration k, and its evaluation.


rule ensemble:
    input:
        cfg=config_snapshot,
        labels="results/{campaign}/iter_{iteration}/labels.h5",
    output:
        "results/{campaign}/iter_{iteration}/ensemble.pt",
    log:
        "results/{campaign}/logs/ensemble/iter_{iteration}.log",
    benchmark:
        "results/{campaign}/benchmarks/ensemble/iter_{iteration}.tsv"
    threads: config["threads"]
    resources:
        runtime=60,
        mem_mb=4000,
    params:
        k=iteration,
    run:
        cgflow_job(
            log,
            threads,
            "ensemble --config {input.cfg} --iteration {params.k}"
            " --labels {input.labels} --out {output}",
        )


rule evaluate:
    input:
        cfg=config_snapshot,
        ensemble="results/{campaign}/iter_{iteration}/ensemble.pt",
        points=previous("points.h5"),
        labels="results/{campaign}/iter_{iteration}/labels.h5",
    output:
        metrics="results/{campaign}/iter_{iteration}/metrics.json",
        plot=report(
            "results/{campaign}/iter_{iteration}/pmf.png",
            caption="../report/pmf.rst",
            category="PMF",
            labels={"campaign": "{campaign}", "iteration": "{iteration}"},
        ),
    log:
        "results/{campaign}/logs/evaluate/iter_{iteration}.log",
    benchmark:
        "results/{campaign}/benchmarks/evaluate/iter_{iteration}.tsv"
    params:
        k=iteration,
    run:
        cgflow_step(
            log,
            "evaluate --config {input.cfg} --iteration {params.k}"
            " --ensemble {input.ensemble} --points {input.points} --labels {input.labels}"
            " --out-metrics {output.metrics} --out-plot {output.plot}",
        )
