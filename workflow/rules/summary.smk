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
    params:
        cfg=config_json,
    run:
        cgflow_step(log, "snapshot --out {output} --json {params.cfg:q}")


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
    params:
        campaign_dir=campaign_folder,
        n=summary_iterations,
        baselines=baselines_option,
    run:
        cgflow_step(
            log,
            "summary --config {input.cfg} --campaign-dir {params.campaign_dir}"
            " --iterations {params.n} --out {output.table} --out-plot {output.plot}"
            " {params.baselines}",
        )


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
    run:
        cgflow_step(
            log,
            "speedup --summary {input.summary}"
            " --baselines {input.baselines} --out {output.table} --out-md {output.md}",
        )


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
