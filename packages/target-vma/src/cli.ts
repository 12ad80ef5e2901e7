/**
 * Entry point of the `vma` binary (see {@link VmaCli}).
 *
 * @since 0.1.0
 */
import * as NodeRuntime from "@effect/platform-node/NodeRuntime"
import * as Effect from "effect/Effect"
import * as Exit from "effect/Exit"
import * as VmaCli from "./VmaCli.js"

NodeRuntime.runMain(
  Effect.flatMap(VmaCli.run(process.argv.slice(2)), (code) =>
    Effect.sync(() => {
      process.exitCode = code
    })),
  {
    disableErrorReporting: true,
    teardown: (exit, onExit) => onExit(Exit.isSuccess(exit) ? Number(process.exitCode ?? 0) : 130)
  }
)
