/*
 * REPORT: the per-brain QC report (views, section profile, per-section table, provenance)
 * from the global step's outputs alone.
 */
process REPORT {
    tag "${meta.id}"
    label 'process_single'
    container 'ghcr.io/octn4/octn4:0.1.0'

    input:
    tuple val(meta), path(results), path(mask)

    output:
    tuple val(meta), path("${meta.id}_report"), emit: report
    tuple val("${task.process}"), val('octn4'), eval('octn4_report.py --version | sed "s/^octn4 //"'), emit: versions, topic: versions

    when:
    task.ext.when == null || task.ext.when

    script:
    def args = task.ext.args ?: ''
    """
    export HOME="\$PWD" MPLCONFIGDIR="\$PWD/.mpl"
    octn4_report.py ${results} --mask ${mask} --out ${meta.id}_report --name ${meta.id} ${args}
    """

    stub:
    """
    mkdir -p ${meta.id}_report
    echo '<!DOCTYPE html><title>octn4 QC: ${meta.id} (stub)</title>' > ${meta.id}_report/report.html
    """
}
