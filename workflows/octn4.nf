/*
 * OCTN4, for any number of brains at once, every voxel-heavy step one task per section:
 *   mask thresholds per section -> mask part per section -> mask finish ->
 *   N4 per section -> assemble -> gains + global N4 -> apply per section -> finish -> QC report.
 */
include { MASK_THRESHOLDS } from '../modules/local/mask_thresholds'
include { MASK_SECTION    } from '../modules/local/mask_section'
include { MASK_FINISH     } from '../modules/local/mask_finish'
include { N4_SECTION      } from '../modules/local/n4_section'
include { ASSEMBLE        } from '../modules/local/assemble'
include { N4_GLOBAL       } from '../modules/local/n4_global'
include { APPLY_SECTION   } from '../modules/local/apply_section'
include { FINISH          } from '../modules/local/finish'
include { REPORT          } from '../modules/local/report'

/*
 * Gather one output per section ([meta, index, file]) into [meta, [file of section 0, 1, ...]]: each brain
 * is released as soon as its n sections are done, its files ordered by index, never by arrival.
 */
def gatherSections(ch) {
    return ch
        .map { meta, index, file -> [groupKey(meta, meta.n_sections), index, file] }
        .groupTuple()
        .map { key, indices, files ->
            def ordered = [indices, files].transpose().sort { pair -> pair[0] }
            [key.getGroupTarget(), ordered.collect { pair -> pair[1] }]
        }
}

workflow OCTN4 {
    take:
    ch_brains   // channel: [ meta, volume ]; meta: id, n_sections, sections or planes, voxel_size

    main:
    // the mask, per section: thresholds, then the part each section owns (its Z closing reaches into the
    // neighbours' planes, so each part task gets its brain's thresholds), then the finish links the parts
    ch_mask_sections = ch_brains.flatMap { meta, volume ->
        (0..<meta.n_sections).collect { index -> [meta, index, volume] }
    }
    MASK_THRESHOLDS(ch_mask_sections)
    ch_thresholds = ch_brains.join(gatherSections(MASK_THRESHOLDS.out.thresholds), failOnMismatch: true,
                                   failOnDuplicate: true)
    MASK_SECTION(ch_thresholds.flatMap { meta, volume, thresholds ->
        (0..<meta.n_sections).collect { index -> [meta, index, volume, thresholds] }
    })
    MASK_FINISH(ch_thresholds.join(gatherSections(MASK_SECTION.out.part), failOnMismatch: true,
                                   failOnDuplicate: true))
    ch_mask = MASK_FINISH.out.mask
    ch_volume_mask = ch_brains.join(ch_mask, failOnMismatch: true, failOnDuplicate: true)

    // fan out: one task per section, the index travels in the tuple
    ch_sections = ch_volume_mask.flatMap { meta, volume, mask ->
        (0..<meta.n_sections).collect { index -> [meta, index, volume, mask] }
    }
    N4_SECTION(ch_sections)
    ASSEMBLE(gatherSections(N4_SECTION.out.record))

    ch_global = ch_volume_mask.join(ASSEMBLE.out.sections, failOnMismatch: true, failOnDuplicate: true)
        .join(gatherSections(N4_SECTION.out.summary), failOnMismatch: true, failOnDuplicate: true)
    N4_GLOBAL(ch_global)

    // fan out again: one apply task per section, each writing the chunk rows it owns
    ch_solution = ch_volume_mask.join(N4_GLOBAL.out.solution, failOnMismatch: true, failOnDuplicate: true)
    ch_apply = ch_solution.flatMap { meta, volume, mask, solution ->
        (0..<meta.n_sections).collect { index -> [meta, index, volume, mask, solution] }
    }
    APPLY_SECTION(ch_apply)

    // gather per brain, ordered by index, then finish
    FINISH(ch_solution.join(gatherSections(APPLY_SECTION.out.part), failOnMismatch: true, failOnDuplicate: true))
    REPORT(FINISH.out.results.join(ch_mask, failOnMismatch: true, failOnDuplicate: true))

    emit:
    results = FINISH.out.results
    report  = REPORT.out.report
    mask    = ch_mask
}
