# Fine-tuning by energy (reverse KL) at the CG points of iteration k-1 (GPU job).


rule finetune:
    input:
        cfg=config_snapshot,
        flow=previous("flow.pt"),
        points=previous("points.h5"),
    output:
        flow="results/{campaign}/iter_{iteration}/flow.pt",
        train="results/{campaign}/iter_{iteration}/train.h5",
    log:
        "results/{campaign}/logs/finetune/iter_{iteration}.log",
    benchmark:
        "results/{campaign}/benchmarks/finetune/iter_{iteration}.tsv"
    conda:
        "../../envs/cgflow.yaml"
    resources:
        gpu=1,
        runtime=240,
        mem_mb=16000,
    params:
        k=iteration,
    shell:
        "cgflow wf finetune --config {input.cfg} --iteration {params.k}"
        " --flow {input.flow} --points {input.points}"
        " --out-flow {output.flow} --out-train {output.train} > {log} 2>&1"
