import { defineProject } from "vitest/config"

export default defineProject({
  test: {
    name: "target-pbs",
    include: ["test/**/*.test.ts"],
    setupFiles: ["../../vitest.setup.ts"]
  }
})
