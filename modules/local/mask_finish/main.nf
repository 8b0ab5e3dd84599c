/*
 * MASK_FINISH: one brain's tissue mask from its sections' parts (shard files taken by hard link, a copy
 * where the filesystem cannot link; the pyramid from the level each part kept), with the per-plane
 * thresholds and statistics.  The input is validated here from the sections' scans combined in Z order
 * (empty, constant or log-scaled volumes are refused): what one scan of the whole would give.  Reads
 * no voxel of the input.
 */
process MASK_FINISH {
    tag "${meta.id}"
    label 'process_single'
    container 'ghcr.io/octn4/octn4:0.1.0'

    input:
    tuple val(meta), path(volume), path(thresholds, stageAs: 'thresholds/*'), path(parts, stageAs: 'parts/*')

    output:
    tuple val(meta), path("${meta.id}.mask.ome.zarr"), emit: mask
    tuple val("${task.process}"), val('octn4'), eval('octn4_mask_finish.py --version | sed "s/^octn4 //"'), emit: versions, topic: versions

    when:
    task.ext.when == null || task.ext.when

    script:
    def args = task.ext.args ?: ''
    def layout = meta.planes ? "--planes ${meta.planes}" : "--sections ${meta.sections}"
    def voxel = meta.voxel_size ? "--voxel-size ${meta.voxel_size}" : ''
    """
    export OMP_NUM_THREADS=${task.cpus} OPENBLAS_NUM_THREADS=${task.cpus} MKL_NUM_THREADS=${task.cpus}
    export HOME="\$PWD" MPLCONFIGDIR="\$PWD/.mpl"
    octn4_mask_finish.py ${volume} ${meta.id}.mask.ome.zarr --thresholds ${thresholds} --parts ${parts} ${layout} ${voxel} ${args}
    """

    stub:
    """
    mkdir -p ${meta.id}.mask.ome.zarr
    echo '{"zarr_format": 3, "node_type": "group"}' > ${meta.id}.mask.ome.zarr/zarr.json
    """
}
