# Labels of iteration k: flow samples at the CG points of k-1, sharded energy batches (one GPU
# job per shard), gathered into PMF labels.


rule sample:
    input:
        unpack(sample_inputs),
    output:
        "results/{campaign}/iter_{iteration}/samples/shard_{shard}.h5",
    log:
        "results/{campaign}/logs/sample/iter_{iteration}_shard_{shard}.log",
    benchmark:
        "results/{campaign}/benchmarks/sample/iter_{iteration}_shard_{shard}.tsv"
    resources:
        runtime=30,
        mem_mb=4000,
    params:
        k=iteration,
        n_shards=n_shards,
        allocation=previous_options,
    run:
        cgflow_job(
            log,
            threads,
            "sample --config {input.cfg} --iteration {params.k}"
            " --flow {input.flow} --points {input.points} {params.allocation}"
            " --shard {wildcards.shard} --n-shards {params.n_shards} --out {output}",
        )


rule energy:
    input:
        cfg=config_snapshot,
        samples="results/{campaign}/iter_{iteration}/samples/shard_{shard}.h5",
    output:
        "results/{campaign}/iter_{iteration}/energies/shard_{shard}.h5",
    log:
        "results/{campaign}/logs/energy/iter_{iteration}_shard_{shard}.log",
    benchmark:
        "results/{campaign}/benchmarks/energy/iter_{iteration}_shard_{shard}.tsv"
    resources:
        gpu=1,
        runtime=60,
        mem_mb=8000,
    run:
        cgflow_job(
            log,
            threads,
            "energy --config {input.cfg} --samples {input.samples}"
            " --shard {wildcards.shard} --out {output}",
        )


rule gather:
    input:
        unpack(gather_inputs),
    output:
        "results/{campaign}/iter_{iteration}/labels.h5",
    log:
        "results/{campaign}/logs/gather/iter_{iteration}.log",
    benchmark:
        "results/{campaign}/benchmarks/gather/iter_{iteration}.tsv"
    params:
        k=iteration,
        previous_labels=previous_labels_option,
    run:
        cgflow_step(
            log,
            "gather --config {input.cfg} --iteration {params.k}"
            " --points {input.points} --samples {input.samples}"
            " --energies {input.energies} {params.previous_labels} --out {output}",
        )
