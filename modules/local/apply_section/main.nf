/*
 * APPLY_SECTION: corrected volume and bias of one section (and their first pyramid level), as an output
 * part: the chunk rows whose first plane lies in the section, so no two tasks write one file.  Reads its own
 * Z range of input and mask (a few planes of the next section where its last chunk row reaches into it) and
 * the global solution.
 */
process APPLY_SECTION {
    tag "${meta.id}:${index}"
    label 'process_medium'
    container 'ghcr.io/octn4/octn4:0.1.0'

    input:
    tuple val(meta), val(index), path(volume), path(mask), path(solution)

    output:
    tuple val(meta), val(index), path("${meta.id}.part_${index}"), emit: part
    tuple val("${task.process}"), val('octn4'), eval('octn4_apply.py --version | sed "s/^octn4 //"'), emit: versions, topic: versions

    when:
    task.ext.when == null || task.ext.when

    script:
    def args = task.ext.args ?: ''
    def voxel = meta.voxel_size ? "--voxel-size ${meta.voxel_size}" : ''
    """
    export OMP_NUM_THREADS=${task.cpus} OPENBLAS_NUM_THREADS=${task.cpus} MKL_NUM_THREADS=${task.cpus}
    export HOME="\$PWD"
    octn4_apply.py ${volume} ${mask} ${solution} ${meta.id}.part_${index} --index ${index} ${voxel} ${args}
    """

    stub:
    """
    mkdir -p ${meta.id}.part_${index}
    echo '{"index": ${index}, "stub": true}' > ${meta.id}.part_${index}/part.json
    """
}
