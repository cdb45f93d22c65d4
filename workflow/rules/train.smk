# Fine-tuning by energy (reverse KL) at the CG points of iteration k-1 (GPU job).


rule finetune:
    input:
        unpack(finetune_inputs),
    output:
        flow="results/{campaign}/iter_{iteration}/flow.pt",
        train="results/{campaign}/iter_{iteration}/train.h5",
    log:
        "results/{campaign}/logs/finetune/iter_{iteration}.log",
    benchmark:
        "results/{campaign}/benchmarks/finetune/iter_{iteration}.tsv"
    threads: config["threads"]
    resources:
        gpu=1,
        runtime=240,
        mem_mb=16000,
    params:
        k=iteration,
        focus=previous_options,
    run:
        cgflow_job(
            log,
            threads,
            "finetune --config {input.cfg} --iteration {params.k}"
            " --flow {input.flow} --points {input.points} {params.focus}"
            " --out-flow {output.flow} --out-train {output.train}",
        )
