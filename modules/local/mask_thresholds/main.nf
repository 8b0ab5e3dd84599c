/*
 * MASK_THRESHOLDS: one section's per-plane tissue thresholds, and its share of the input scan (the slabs
 * that start in it: NaN, Inf and negative values are refused here, naming the section).  Reads its own
 * planes and their smoothing halo; memory is set by the plane size, not the section's thickness.
 */
process MASK_THRESHOLDS {
    tag "${meta.id}:${index}"
    label 'process_low'
    container 'ghcr.io/octn4/octn4:0.1.0'

    input:
    tuple val(meta), val(index), path(volume)

    output:
    tuple val(meta), val(index), path("${meta.id}.thresholds_${index}"), emit: thresholds
    tuple val("${task.process}"), val('octn4'), eval('octn4_mask_thresholds.py --version | sed "s/^octn4 //"'), emit: versions, topic: versions

    when:
    task.ext.when == null || task.ext.when

    script:
    def args = task.ext.args ?: ''
    def layout = meta.planes ? "--planes ${meta.planes}" : "--sections ${meta.sections}"
    def voxel = meta.voxel_size ? "--voxel-size ${meta.voxel_size}" : ''
    """
    export OMP_NUM_THREADS=${task.cpus} OPENBLAS_NUM_THREADS=${task.cpus} MKL_NUM_THREADS=${task.cpus}
    export HOME="\$PWD"
    octn4_mask_thresholds.py ${volume} ${meta.id}.thresholds_${index} --index ${index} ${layout} ${voxel} ${args}
    """

    stub:
    """
    mkdir -p ${meta.id}.thresholds_${index}
    echo '{"index": ${index}, "stub": true}' > ${meta.id}.thresholds_${index}/thresholds.json
    """
}
