// Prints "N passed, N failed" from a vitest JSON report; exits 1 when no test ran or any failed.
import { readFileSync } from "node:fs"

const path = process.argv[2]
let report
try {
  report = JSON.parse(readFileSync(path, "utf8"))
} catch (error) {
  process.stdout.write(`no test report at ${path}: ${error.message}\n0 passed, 1 failed\n`)
  process.exit(1)
}
const passed = report.numPassedTests ?? 0
// a test file that fails to load has no failed test of its own: count it as one failure
const brokenFiles = (report.testResults ?? []).filter((file) =>
  file.status === "failed" && !(file.assertionResults ?? []).some((test) => test.status === "failed")
).length
const failed = (report.numFailedTests ?? 0) + brokenFiles
const skipped = (report.numPendingTests ?? 0) + (report.numTodoTests ?? 0)
process.stdout.write(`${passed} passed, ${failed} failed${skipped > 0 ? `, ${skipped} skipped` : ""}\n`)
process.exit(failed > 0 || passed === 0 ? 1 : 0)
