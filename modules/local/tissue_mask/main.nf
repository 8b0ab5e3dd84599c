/*
 * TISSUE_MASK: validate one brain's volume (one streaming pass) and write its tissue mask.
 * Reads the whole volume in 16-plane slabs; memory is set by the plane size, not the depth.
 * Sections are masked in task.cpus processes (each holds one slab and its halo).
 */
process TISSUE_MASK {
    tag "${meta.id}"
    label 'process_medium'
    container 'ghcr.io/octn4/octn4:0.1.0'

    input:
    tuple val(meta), path(volume)

    output:
    tuple val(meta), path("${meta.id}.mask.ome.zarr"), emit: mask
    tuple val("${task.process}"), val('octn4'), eval('octn4_mask.py --version | sed "s/^octn4 //"'), emit: versions, topic: versions

    when:
    task.ext.when == null || task.ext.when

    script:
    def args = task.ext.args ?: ''
    def layout = meta.planes ? "--planes ${meta.planes}" : "--sections ${meta.sections}"
    def voxel = meta.voxel_size ? "--voxel-size ${meta.voxel_size}" : ''
    """
    export OMP_NUM_THREADS=${task.cpus} OPENBLAS_NUM_THREADS=${task.cpus} MKL_NUM_THREADS=${task.cpus}
    export HOME="\$PWD" MPLCONFIGDIR="\$PWD/.mpl"
    octn4_mask.py ${volume} ${meta.id}.mask.ome.zarr ${layout} ${voxel} --workers ${task.cpus} ${args}
    """

    stub:
    """
    mkdir -p ${meta.id}.mask.ome.zarr
    echo '{"zarr_format": 3, "node_type": "group"}' > ${meta.id}.mask.ome.zarr/zarr.json
    """
}
