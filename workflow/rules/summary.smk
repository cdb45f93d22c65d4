# The validated config of the campaign (input of every rule) and the campaign summary (the
# aggregator: the only rule whose input walks the convergence checkpoints).


rule config_snapshot:
    output:
        "results/{campaign}/config.yaml",
    log:
        "results/{campaign}/logs/config_snapshot/config_snapshot.log",
    benchmark:
        "results/{campaign}/benchmarks/config_snapshot/config_snapshot.tsv"
    conda:
        "../../envs/cgflow.yaml"
    params:
        cfg=config_json,
    shell:
        "cgflow wf snapshot --out {output} --json {params.cfg:q} > {log} 2>&1"


rule summary:
    input:
        unpack(summary_inputs),
        cfg=config_snapshot,
        start="results/{campaign}/iter_000/start.h5",
        flow0="results/{campaign}/iter_000/flow.pt",
        points0="results/{campaign}/iter_000/points.h5",
    output:
        "results/{campaign}/summary.csv",
    log:
        "results/{campaign}/logs/summary/summary.log",
    benchmark:
        "results/{campaign}/benchmarks/summary/summary.tsv"
    conda:
        "../../envs/cgflow.yaml"
    params:
        campaign_dir=campaign_folder,
        n=summary_iterations,
    shell:
        "cgflow wf summary --config {input.cfg} --campaign-dir {params.campaign_dir}"
        " --iterations {params.n} --out {output} > {log} 2>&1"
