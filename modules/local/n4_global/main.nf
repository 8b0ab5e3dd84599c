/*
 * N4_GLOBAL: section gains and global N4 over the re-assembled stack, from the sections' summaries (the
 * volume and mask are staged as links, or lazily: only their metadata is read).  Writes the solution (every
 * section's field and gain, the global field, provenance: a few hundred kB) that the per-section
 * APPLY_SECTION tasks and FINISH read; it writes no volume.
 * Fits on the GPU when the task was given one (task.accelerator) and the engine is octn4's (and fails,
 * naming what is missing, when that GPU is not usable), on the CPU otherwise; the device is recorded in
 * the outputs.
 */
process N4_GLOBAL {
    tag "${meta.id}"
    label 'process_gpu'
    container 'ghcr.io/octn4/octn4-cuda:0.1.0'

    input:
    tuple val(meta), path(volume), path(mask), path(sections), path(summaries, stageAs: 'summaries/*')

    output:
    tuple val(meta), path("${meta.id}.global.json"), emit: solution
    tuple val("${task.process}"), val('octn4'), eval('octn4_global.py --version | sed "s/^octn4 //"'), emit: versions, topic: versions

    when:
    task.ext.when == null || task.ext.when

    script:
    def args = task.ext.args ?: ''
    // a task granted a GPU must fit there: --device cuda fails loudly (exit 2) when CuPy or the device is
    // missing (a CPU-only image, Docker without --gpus); ext.device may say 'cpu' (the SimpleITK engine)
    // or 'auto' (recorded as a warning in the outputs); without an accelerator it fits on the CPU
    def device = task.accelerator ? (task.ext.device ?: 'cuda') : 'cpu'
    def voxel = meta.voxel_size ? "--voxel-size ${meta.voxel_size}" : ''
    """
    export OMP_NUM_THREADS=${task.cpus} OPENBLAS_NUM_THREADS=${task.cpus} MKL_NUM_THREADS=${task.cpus}
    export HOME="\$PWD" MPLCONFIGDIR="\$PWD/.mpl"
    octn4_global.py ${volume} ${mask} ${sections} ${meta.id}.global.json --summaries ${summaries} --device ${device} --threads ${task.cpus} --workers ${task.cpus} ${voxel} ${args}
    """

    stub:
    """
    echo '{"stub": true}' > ${meta.id}.global.json
    """
}
