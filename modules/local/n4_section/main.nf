/*
 * N4_SECTION: N4 on one serial section of one brain; writes its bias field as a control lattice (JSON) and
 * its summary for N4_GLOBAL (its share of the global fit grid, its end planes: megabytes, so the global
 * task never reads the volume).
 * The volume and mask are staged as links (shared filesystems) or lazily (Fusion on cloud executors):
 * the task reads only the chunks of its own Z slab, on a shrunk grid.
 */
process N4_SECTION {
    tag "${meta.id}:${index}"
    label 'process_medium'
    container 'ghcr.io/octn4/octn4:0.1.0'

    input:
    tuple val(meta), val(index), path(volume), path(mask)

    output:
    tuple val(meta), val(index), path("${meta.id}.section_${index}.json"), emit: record
    tuple val(meta), val(index), path("${meta.id}.summary_${index}"), emit: summary
    tuple val("${task.process}"), val('octn4'), eval('octn4_section.py --version | sed "s/^octn4 //"'), emit: versions, topic: versions

    when:
    task.ext.when == null || task.ext.when

    script:
    def args = task.ext.args ?: ''
    def layout = meta.planes ? "--planes ${meta.planes}" : "--sections ${meta.sections}"
    def voxel = meta.voxel_size ? "--voxel-size ${meta.voxel_size}" : ''
    """
    export OMP_NUM_THREADS=${task.cpus} OPENBLAS_NUM_THREADS=${task.cpus} MKL_NUM_THREADS=${task.cpus}
    export HOME="\$PWD" MPLCONFIGDIR="\$PWD/.mpl"
    octn4_section.py ${volume} ${mask} ${meta.id}.section_${index}.json --index ${index} ${layout} ${voxel} \\
        --summary ${meta.id}.summary_${index} --threads ${task.cpus} ${args}
    """

    stub:
    """
    echo '{"index": ${index}, "stub": true}' > ${meta.id}.section_${index}.json
    mkdir -p ${meta.id}.summary_${index}
    """
}
