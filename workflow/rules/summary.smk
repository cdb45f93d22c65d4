# The validated config of the campaign (input of every rule), the campaign summary (the
# aggregator, whose input walks the convergence checkpoints), the speedup table against the
# configured baselines, and the backmapped structures of the final flow (whose input walks
# the checkpoints too, to find the last iteration).


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
    output:
        table=report(
            "results/{campaign}/summary.csv",
            caption="../report/summary.rst",
            category="Convergence",
            labels={"campaign": "{campaign}", "figure": "table"},
        ),
        plot=report(
            "results/{campaign}/convergence.png",
            caption="../report/convergence.rst",
            category="Convergence",
            labels={"campaign": "{campaign}", "figure": "curves"},
        ),
    log:
        "results/{campaign}/logs/summary/summary.log",
    benchmark:
        "results/{campaign}/benchmarks/summary/summary.tsv"
    conda:
        "../../envs/cgflow.yaml"
    params:
        campaign_dir=campaign_folder,
        n=summary_iterations,
        baselines=baselines_option,
    shell:
        "cgflow wf summary --config {input.cfg} --campaign-dir {params.campaign_dir}"
        " --iterations {params.n} --out {output.table} --out-plot {output.plot}"
        " {params.baselines} > {log} 2>&1"


rule speedup:
    input:
        summary="results/{campaign}/summary.csv",
        baselines=baselines_file,
    output:
        table=report(
            "results/{campaign}/speedup.csv",
            caption="../report/speedup.rst",
            category="Convergence",
            labels={"campaign": "{campaign}", "figure": "speedup"},
        ),
        md="results/{campaign}/speedup.md",
    log:
        "results/{campaign}/logs/speedup/speedup.log",
    benchmark:
        "results/{campaign}/benchmarks/speedup/speedup.tsv"
    conda:
        "../../envs/cgflow.yaml"
    shell:
        "cgflow wf speedup --summary {input.summary}"
        " --baselines {input.baselines} --out {output.table} --out-md {output.md}"
        " > {log} 2>&1"


rule backmap:
    input:
        cfg=config_snapshot,
        flow=final_flow,
    output:
        pdb=expand("results/{{campaign}}/backmap/{point}.pdb", point=BACKMAP_POINTS),
        dcd=expand("results/{{campaign}}/backmap/{point}.dcd", point=BACKMAP_POINTS),
        info="results/{campaign}/backmap/backmap.json",
    log:
        "results/{campaign}/logs/backmap/backmap.log",
    benchmark:
        "results/{campaign}/benchmarks/backmap/backmap.tsv"
    conda:
        "../../envs/cgflow.yaml"
    resources:
        runtime=30,
        mem_mb=4000,
    params:
        points=backmap_points_json,
        structures=config["backmap"]["structures"],
        out_dir=backmap_folder,
    shell:
        "cgflow wf backmap --config {input.cfg} --flow {input.flow}"
        " --points {params.points:q} --structures {params.structures}"
        " --out-dir {params.out_dir} > {log} 2>&1"
