/*
 * FINISH: one brain's outputs from its sections' parts: corrected and bias (the parts' shard files taken by
 * hard link, a copy where the filesystem cannot link; pyramids built from the first level each part kept of
 * its planes), fields.json and metrics.json, published complete or not at all.
 */
process FINISH {
    tag "${meta.id}"
    label 'process_medium'
    container 'ghcr.io/octn4/octn4:0.1.0'

    input:
    tuple val(meta), path(volume), path(mask), path(solution), path(parts, stageAs: 'parts/*')

    output:
    tuple val(meta), path("${meta.id}"), emit: results
    tuple val("${task.process}"), val('octn4'), eval('octn4_finish.py --version | sed "s/^octn4 //"'), emit: versions, topic: versions

    when:
    task.ext.when == null || task.ext.when

    script:
    def args = task.ext.args ?: ''
    def voxel = meta.voxel_size ? "--voxel-size ${meta.voxel_size}" : ''
    """
    export OMP_NUM_THREADS=${task.cpus} OPENBLAS_NUM_THREADS=${task.cpus} MKL_NUM_THREADS=${task.cpus}
    export HOME="\$PWD"
    octn4_finish.py ${volume} ${mask} ${solution} ${meta.id} ${parts} ${voxel} --threads ${task.cpus} ${args}
    """

    stub:
    """
    mkdir -p ${meta.id}/corrected.ome.zarr ${meta.id}/bias.ome.zarr
    echo '{"stub": true}' > ${meta.id}/fields.json
    echo '{"stub": true}' > ${meta.id}/metrics.json
    """
}
