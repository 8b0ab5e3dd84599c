/*
 * MASK_SECTION: one section's part of the tissue mask: the chunk rows whose first plane lies in it (so no
 * two tasks write one file), with their first pyramid level and the planes' tissue statistics.  Reads
 * those rows, the few planes each side that the Z closing and the smoothing reach, and the brain's
 * thresholds folders (a few kB each).
 */
process MASK_SECTION {
    tag "${meta.id}:${index}"
    label 'process_low'
    container 'ghcr.io/octn4/octn4:0.1.0'

    input:
    tuple val(meta), val(index), path(volume), path(thresholds, stageAs: 'thresholds/*')

    output:
    tuple val(meta), val(index), path("${meta.id}.mask_part_${index}"), emit: part
    tuple val("${task.process}"), val('octn4'), eval('octn4_mask_section.py --version | sed "s/^octn4 //"'), emit: versions, topic: versions

    when:
    task.ext.when == null || task.ext.when

    script:
    def args = task.ext.args ?: ''
    def layout = meta.planes ? "--planes ${meta.planes}" : "--sections ${meta.sections}"
    def voxel = meta.voxel_size ? "--voxel-size ${meta.voxel_size}" : ''
    """
    export OMP_NUM_THREADS=${task.cpus} OPENBLAS_NUM_THREADS=${task.cpus} MKL_NUM_THREADS=${task.cpus}
    export HOME="\$PWD"
    octn4_mask_section.py ${volume} ${meta.id}.mask_part_${index} ${thresholds} --index ${index} ${layout} ${voxel} ${args}
    """

    stub:
    """
    mkdir -p ${meta.id}.mask_part_${index}
    echo '{"index": ${index}, "stub": true}' > ${meta.id}.mask_part_${index}/part.json
    """
}
