import { defineProject } from "vitest/config"

export default defineProject({
  test: {
    name: "target-vma",
    include: ["test/**/*.test.ts"],
    setupFiles: ["../../vitest.setup.ts"]
  }
})
