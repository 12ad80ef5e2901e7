import { defineProject } from "vitest/config"

export default defineProject({
  test: {
    name: "qmp",
    include: ["test/**/*.test.ts"],
    setupFiles: ["../../vitest.setup.ts"]
  }
})
