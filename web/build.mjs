// Bundles src/main.js with three.js into the package's static folder (the file `facegan explore`
// serves), minified, and copies three.js's MIT license beside it. Run: npm --prefix web run build
import { copyFileSync, readFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import * as esbuild from "esbuild";

const here = dirname(fileURLToPath(import.meta.url));
const staticDir = join(here, "..", "src", "facegan", "explore", "static");
const three = JSON.parse(readFileSync(join(here, "node_modules", "three", "package.json"), "utf8"));

const result = await esbuild.build({
  entryPoints: [join(here, "src", "main.js")],
  outfile: join(staticDir, "explore.js"),
  bundle: true,
  minify: true,
  format: "esm",
  target: "es2020",
  legalComments: "none", // three's license ships as THREE_LICENSE instead
  banner: {
    js: `/* facegan explore: built from web/src by \`npm --prefix web run build\` (do not edit); ` +
      `includes three.js ${three.version}, MIT license in THREE_LICENSE */`,
  },
  metafile: true,
  logLevel: "warning",
});
copyFileSync(join(here, "node_modules", "three", "LICENSE"), join(staticDir, "THREE_LICENSE"));
const bytes = Object.values(result.metafile.outputs).reduce((n, o) => n + o.bytes, 0);
console.log(`wrote ${join("src", "facegan", "explore", "static", "explore.js")} (${(bytes / 1024).toFixed(0)} KiB) and THREE_LICENSE`);
