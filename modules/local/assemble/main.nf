/*
 * ASSEMBLE: gather one brain's section records, order them by section index and check the set.
 * Fails the brain when a section is missing, repeated or not contiguous.
 */
process ASSEMBLE {
    tag "${meta.id}"
    label 'process_single'
    container 'ghcr.io/octn4/octn4:0.1.0'

    input:
    tuple val(meta), path(records, stageAs: 'records/*')

    output:
    tuple val(meta), path("${meta.id}.sections.json"), emit: sections
    tuple val("${task.process}"), val('octn4'), eval('octn4_assemble.py --version | sed "s/^octn4 //"'), emit: versions, topic: versions

    when:
    task.ext.when == null || task.ext.when

    script:
    def args = task.ext.args ?: ''
    """
    export HOME="\$PWD"
    octn4_assemble.py ${meta.id}.sections.json ${records} --expected ${meta.n_sections} ${args}
    """

    stub:
    """
    echo '{"sections": [], "stub": true}' > ${meta.id}.sections.json
    """
}
