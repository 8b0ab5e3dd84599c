#!/usr/bin/env nextflow
/*
 * octn4: N4 bias-field correction for serial-section OCT volumes.
 *
 * The Nextflow workflow (TISSUE_MASK -> N4_SECTION fan-out -> ASSEMBLE ->
 * N4_GLOBAL -> report, one module per process under modules/local/) is not
 * written yet.  Its processes will call the bin/ scripts that exist today;
 * until then, `octn4 run` runs the same stages on one machine.
 */

workflow {
    error "The octn4 Nextflow workflow is not available yet: use 'octn4 run' (see README.md)."
}
