// Nextflow's own parser (nf-lang, inside the language-server jar) and Groovy, for octn4's offline checks.
//
//   java -cp language-server-all.jar groovy.ui.GroovyMain nf_tool.groovy extract FILE.nf...
//       JSON per file: parse errors, and per process its name and the source text of its
//       directives, inputs, outputs, script and stub blocks.
//   java -cp language-server-all.jar groovy.ui.GroovyMain nf_tool.groovy render JOBS.json
//       Evaluates blocks as Nextflow would write .command.sh: each job names a module file, a
//       process, a block (script|stub) and the task's bindings; ext.args may be given as the
//       closure source from a config file, evaluated with `params`.  Also evaluates the
//       process's output path patterns.  Prints a JSON list of {command, outputs}.
//   java -cp language-server-all.jar groovy.ui.GroovyMain nf_tool.groovy params CONFIG PROJECT_DIR
//       The `params { }` block of a config file, evaluated, as JSON.
import groovy.json.JsonOutput
import groovy.json.JsonSlurper
import nextflow.script.control.ScriptParser

def sliceOf(List<String> lines, node) {
    if (node == null || node.lineNumber < 1) return null
    def out = []
    for (int ln = node.lineNumber; ln <= node.lastLineNumber; ln++) {
        def s = lines[ln - 1]
        int from = (ln == node.lineNumber) ? node.columnNumber - 1 : 0
        int to = (ln == node.lastLineNumber) ? node.lastColumnNumber - 1 : s.length()
        out << s.substring(Math.min(from, s.length()), Math.min(to, s.length()))
    }
    out.join('\n')
}

def parse(String path) {
    def f = new File(path)
    def unit = new ScriptParser().parse(f)
    def errors = []
    if (unit.errorCollector.hasErrors()) {
        unit.errorCollector.errors.each { e -> errors << (e.respondsTo('getCause') && e.cause ? e.cause.message : e.toString()) }
    }
    [unit: unit, lines: f.readLines(), errors: errors]
}

def extract(List<String> files) {
    files.collect { path ->
        def p = parse(path)
        def procs = p.errors ? [] : (p.unit.AST?.processes ?: []).collect { pr ->
            [name: pr.name, line: pr.lineNumber, directives: sliceOf(p.lines, pr.directives),
             inputs: sliceOf(p.lines, pr.inputs), outputs: sliceOf(p.lines, pr.outputs),
             script: sliceOf(p.lines, pr.exec), stub: sliceOf(p.lines, pr.stub)]
        }
        [file: path, errors: p.errors, processes: procs]
    }
}

def render(String jobsFile) {
    def jobs = new JsonSlurper().parse(new File(jobsFile))
    jobs.collect { job ->
        try {
            renderOne(job)
        } catch (Throwable e) {
            [process: job.process, block: job.block, error: e.toString()]
        }
    }
}

def renderOne(job) {
    def p = parse(job.file)
    assert !p.errors : "${job.file}: ${p.errors}"
    def pr = p.unit.AST.processes.find { it.name == job.process }
    assert pr : "process ${job.process} not found in ${job.file}"
    def binding = new Binding(job.bindings)
    def task = job.bindings.task
    def params = job.params ?: [:]
    (job.ext_sources ?: [:]).each { key, src ->      // every ext.<key> of the process's withName block
        def c = new GroovyShell(new Binding([params: params])).evaluate(src)
        task.ext[key] = (c instanceof Closure ? c.call() : c)?.toString()
    }
    if (job.ext_args_source) {
        def c = new GroovyShell(new Binding([params: params])).evaluate(job.ext_args_source)
        task.ext.args = (c instanceof Closure ? c.call() : c)?.toString()
    }
    def node = job.block == 'stub' ? pr.stub : pr.exec
    def text = sliceOf(p.lines, node).replaceFirst(/^\s*(script|stub|shell)\s*:/, '')
    def shell = new GroovyShell(binding)
    def command = shell.evaluate(text).toString().stripIndent()
    // output patterns: path("...") / path('...'), evaluated with the same bindings
    def outputs = []
    def m = sliceOf(p.lines, pr.outputs) =~ /path\(\s*("[^"]*"|'[^']*')/
    m.each { all, lit -> outputs << shell.evaluate(lit).toString() }
    [process: job.process, block: job.block, command: command, outputs: outputs]
}

def configParams(String path, String projectDir) {
    def text = new File(path).text
    def start = text.indexOf('params {')
    if (start < 0) return [:]
    int depth = 0, end = -1
    for (int i = text.indexOf('{', start); i < text.length(); i++) {
        if (text[i] == '{') depth++
        else if (text[i] == '}') { depth--; if (depth == 0) { end = i; break } }
    }
    def slurper = new ConfigSlurper()
    slurper.setBinding([projectDir: projectDir])
    def cfg = slurper.parse(text.substring(start, end + 1))
    def out = [:]
    cfg.params.each { k, v -> out[k] = (v instanceof ConfigObject && v.isEmpty()) ? null : v }
    // keys assigned null are dropped by ConfigSlurper: recover the names from the source
    (text.substring(start, end + 1) =~ /(?m)^\s*(\w+)\s*=/).each { all, k -> if (!out.containsKey(k)) out[k] = null }
    out
}

def (mode) = args as List
def rest = (args as List).drop(1)
def result
switch (mode) {
    case 'extract': result = extract(rest); break
    case 'render': result = render(rest[0]); break
    case 'params': result = configParams(rest[0], rest[1]); break
    default: throw new IllegalArgumentException("unknown mode ${mode}")
}
println JsonOutput.toJson(result)
