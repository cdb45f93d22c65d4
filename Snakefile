# cgflow: active learning of a coarse-grained free-energy surface with a conditional flow.
# One invocation runs the campaign of the config to convergence:
#   snakemake --profile profiles/local                      # config/config.yaml
#   snakemake --profile profiles/local --configfile config/mueller_brown.yaml
# The rules are declarations calling `cgflow wf <step>` (heavy ones as shell commands, cheap
# local ones inside this process via cgflow_step); all science is in src/cgflow.


from snakemake.utils import min_version

# 9.21.1: checkpoint fixes the convergence walk relies on (snakemake-practice.md, 2.3)
min_version("9.21.1")


# The default main job. A --configfile on the command line replaces it whole (a nested merge
# would leak free-form keys such as flow hyperparameters from one system into another).
if not workflow.overwrite_configfiles:

    configfile: "config/config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"


# cheap steps run in the Snakemake process itself (on the submit host under SLURM)
localrules:
    config_snapshot,
    initial_points,
    gather,
    evaluate,
    walkers,
    select,
    check,
    summary,
    speedup,


rule all:
    default_target: True
    input:
        final_output(),


include: "workflow/rules/start.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/energy.smk"
include: "workflow/rules/ensemble.smk"
include: "workflow/rules/select.smk"
include: "workflow/rules/summary.smk"
