/*
 * OCTN4: tissue mask -> N4 per section (one task per section) -> assemble -> gains + global N4 ->
 * apply per section (one task per section) -> finish (outputs, pyramids) -> QC report, for any number
 * of brains at once.
 */
include { TISSUE_MASK   } from '../modules/local/tissue_mask'
include { N4_SECTION    } from '../modules/local/n4_section'
include { ASSEMBLE      } from '../modules/local/assemble'
include { N4_GLOBAL     } from '../modules/local/n4_global'
include { APPLY_SECTION } from '../modules/local/apply_section'
include { FINISH        } from '../modules/local/finish'
include { REPORT        } from '../modules/local/report'

workflow OCTN4 {
    take:
    ch_brains   // channel: [ meta, volume ]; meta: id, n_sections, sections or planes, voxel_size

    main:
    TISSUE_MASK(ch_brains)
    ch_volume_mask = ch_brains.join(TISSUE_MASK.out.mask, failOnMismatch: true, failOnDuplicate: true)

    // fan out: one task per section, the index travels in the tuple
    ch_sections = ch_volume_mask.flatMap { meta, volume, mask ->
        (0..<meta.n_sections).collect { index -> [meta, index, volume, mask] }
    }
    N4_SECTION(ch_sections)

    // gather per brain: released as soon as its n sections are done, ordered by index, never by arrival
    ch_records = N4_SECTION.out.record
        .map { meta, index, record -> [groupKey(meta, meta.n_sections), index, record] }
        .groupTuple()
        .map { key, indices, records ->
            def ordered = [indices, records].transpose().sort { pair -> pair[0] }
            [key.getGroupTarget(), ordered.collect { pair -> pair[1] }]
        }
    ASSEMBLE(ch_records)

    ch_global = ch_volume_mask.join(ASSEMBLE.out.sections, failOnMismatch: true, failOnDuplicate: true)
    N4_GLOBAL(ch_global)

    // fan out again: one apply task per section, each writing the chunk rows it owns
    ch_solution = ch_volume_mask.join(N4_GLOBAL.out.solution, failOnMismatch: true, failOnDuplicate: true)
    ch_apply = ch_solution.flatMap { meta, volume, mask, solution ->
        (0..<meta.n_sections).collect { index -> [meta, index, volume, mask, solution] }
    }
    APPLY_SECTION(ch_apply)

    // gather per brain, ordered by index, then finish
    ch_parts = APPLY_SECTION.out.part
        .map { meta, index, part -> [groupKey(meta, meta.n_sections), index, part] }
        .groupTuple()
        .map { key, indices, parts ->
            def ordered = [indices, parts].transpose().sort { pair -> pair[0] }
            [key.getGroupTarget(), ordered.collect { pair -> pair[1] }]
        }
    FINISH(ch_solution.join(ch_parts, failOnMismatch: true, failOnDuplicate: true))
    REPORT(FINISH.out.results.join(TISSUE_MASK.out.mask, failOnMismatch: true, failOnDuplicate: true))

    emit:
    results = FINISH.out.results
    report  = REPORT.out.report
    mask    = TISSUE_MASK.out.mask
}
