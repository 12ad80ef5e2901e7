import { assert, it } from "@effect/vitest"
import { Effect } from "effect"

it.effect("workspace runs effect tests", () => Effect.gen(function*() {
  assert.strictEqual(yield* Effect.succeed(1), 1)
}))
