#!/usr/bin/env nextflow
/*
 * octn4: N4 bias-field correction for serial-section OCT brain volumes.
 *
 * main.nf only wires: parameter validation -> input channel -> the OCTN4 workflow
 * (workflows/octn4.nf) -> completion summary.  All logic lives in the octn4
 * Python package; each process calls one bin/ script.
 */
include { validateParameters; paramsSummaryLog; samplesheetToList } from 'plugin/nf-schema'
include { OCTN4 } from './workflows/octn4'

// meta map of one brain; `planes` ("30;30;28") wins over `sections`
def brainMeta(id, sections, planes, voxelSize) {
    def planeList = planes ? planes.toString().tokenize(';, ').collect { p -> p.toInteger() } : null
    if (!planeList && !sections) {
        error "brain '${id}': give the number of sections or the planes of each section"
    }
    [
        id        : id,
        sections  : planeList ? null : sections as Integer,
        planes    : planeList ? planeList.join(',') : null,
        n_sections: planeList ? planeList.size() : sections as Integer,
        voxel_size: voxelSize ? voxelSize.toString().tokenize(';, ').join(',') : null,
    ]
}

workflow {
    main:
    validateParameters()
    log.info paramsSummaryLog(workflow)

    def ch_brains
    if (params.input.toString().endsWith('.csv')) {
        ch_brains = channel
            .fromList(samplesheetToList(params.input, "${projectDir}/assets/schema_input.json"))
            .map { meta, volume, sections, planes, voxel_size ->
                [brainMeta(meta.id, sections, planes, voxel_size), volume]
            }
    }
    else {
        def volume = file(params.input, checkIfExists: true)
        def id = params.id ?: volume.name.replaceAll(/(\.ome)?\.(zarr|nii\.gz|nii)$/, '')
        ch_brains = channel.of([brainMeta(id, params.sections, params.planes, params.voxel_size), volume])
    }
    OCTN4(ch_brains)

    onComplete:
    log.info(workflow.success
        ? "octn4: done; results and QC reports in ${params.outdir}"
        : "octn4: failed; see ${params.outdir}/pipeline_info/ and the task's .command.log")
}
