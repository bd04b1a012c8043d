// OHIF (the viewer the server ships at /ohif/) in headless Chromium, driven as a user drives it.
//
//   node tests/e2e/ohif_check.mjs <server URL> <StudyInstanceUID> <SeriesInstanceUID> <i,j,k> <output folder>
//
// 1. opens the study in the MONAI Label mode (/ohif/monai-label?StudyInstanceUIDs=...) and waits
//    for the CT volume in the axial viewport; double-click maximises that viewport;
// 2. connects the MONAI Label panel to the server (types its URL, clicks the connect button);
// 3. scrolls the axial viewport with the mouse wheel to slice k, opens "Point Prompts", picks
//    "liver", clicks voxel [i, j] with the mouse and presses "Run": the panel sends its own
//    POST /infer/<model> and copies the answer into the viewer's labelmap;
// 4. saves what the viewer now holds as the final label with the request this project's save
//    sends (PUT /datastore/label, a NIfTI on the image grid), sent from the page with its fetch
//    (the 0.8.5 panel has no save button): the server stores it in the PACS as a DICOM SEG;
// 5. reloads the study and reads the viewer's series list.
//
// Screenshots of every step go to the output folder (01-loaded.png ...). The last line on stdout
// is one JSON object (the result), also written to <output folder>/result.json; a step that fails
// is reported there as {"error": ..., "step": ...} with a screenshot of the moment (exit status 1).

import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import puppeteer from 'puppeteer-core';

const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
const FLAGS = ['--headless', '--no-sandbox', '--disable-dev-shm-usage', '--use-angle=swiftshader', '--enable-unsafe-swiftshader',
  '--disable-background-networking', '--disable-component-update', '--disable-sync', '--no-first-run',
  '--window-size=1600,1000'];
const MODEL = process.env.OHIF_MODEL || 'adaptsam';
const SEGMENT = 'liver';

const [serverArg, study, series, clickArg, outDir, token] = process.argv.slice(2);
if (!outDir) {
  console.error('usage: node ohif_check.mjs <server URL> <StudyInstanceUID> <SeriesInstanceUID> <i,j,k> <output folder>');
  process.exit(2);
}
const server = serverArg.replace(/\/+$/, '');
const click = clickArg.replace(/[\[\]\s]/g, '').split(',').map(Number);
fs.mkdirSync(outDir, {recursive: true});

const t0 = Date.now();
const result = {server, study, series, click, model: MODEL, timings_s: {}, screenshots: {}, http_errors: [], console_errors: []};
let step = 'launch';
let page = null;
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const mark = (name) => { result.timings_s[name] = +((Date.now() - t0) / 1000).toFixed(1); };

async function shot(page, name, clip) {
  const file = path.join(outDir, `${name}.png`);
  await page.screenshot({path: file, ...(clip ? {clip} : {})});
  result.screenshots[name] = file;
  return file;
}

async function waitFor(page, what, fn, arg, timeoutMs) {
  try {
    return await page.waitForFunction(fn, {timeout: timeoutMs, polling: 250}, arg);
  } catch (e) {
    throw new Error(`${what}: not within ${timeoutMs / 1000} s`);
  }
}

// the rectangle of a viewport's element in page (= screenshot) pixels
async function viewportRect(page, id) {
  return page.evaluate((id) => {
    const vp = window.services.cornerstoneViewportService.getCornerstoneViewport(id);
    const r = vp.element.getBoundingClientRect();
    return {x: r.x, y: r.y, width: r.width, height: r.height};
  }, id);
}

async function axialState(page, ijk) {
  // where voxel ijk is on the axial viewport's canvas, and how far (mm) its plane is from the slice shown
  return page.evaluate((ijk) => {
    const vp = window.services.cornerstoneViewportService.getCornerstoneViewport('mpr-axial');
    const {imageData} = vp.getImageData();
    const world = imageData.indexToWorld(ijk);
    const cam = vp.getCamera();
    const n = cam.viewPlaneNormal;
    const d = (world[0] - cam.focalPoint[0]) * n[0] + (world[1] - cam.focalPoint[1]) * n[1] + (world[2] - cam.focalPoint[2]) * n[2];
    const canvas = vp.worldToCanvas(world);
    return {world: Array.from(world), distance_mm: d, canvas: Array.from(canvas), spacing: Array.from(imageData.getSpacing()),
            slice_index: vp.getSliceIndex(), slices: vp.getNumberOfSlices()};
  }, ijk);
}

async function main() {
  const userDataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'ohif-chromium-'));
  const browser = await puppeteer.launch({executablePath: CHROMIUM, headless: true, args: FLAGS, userDataDir,
    defaultViewport: {width: 1600, height: 1000, deviceScaleFactor: 1}, protocolTimeout: 120000});
  try {
    page = await browser.newPage();
    page.on('dialog', (d) => d.accept().catch(() => {}));
    page.on('console', (m) => {
      if (m.type() === 'error') result.console_errors.push(m.text().slice(0, 300));
    });
    page.on('response', (r) => {
      const u = r.url();
      if (r.status() >= 400 && !u.includes('favicon')) result.http_errors.push(`${r.status()} ${r.request().method()} ${u.slice(0, 200)}`);
    });
    page.on('requestfailed', (r) => {
      const u = r.url();
      if (!u.includes('fonts.googleapis.com')) result.http_errors.push(`failed ${r.method()} ${u.slice(0, 200)} ${r.failure()?.errorText}`);
    });

    // ---- 1. the study in the MONAI Label mode ---------------------------------------------------
    if (token) {  // the server wants its API token: log in once by link, the cookie does the rest
      step = 'log in with the API token link';
      const login = await page.goto(`${server}/ohif/?token=${encodeURIComponent(token)}`, {waitUntil: 'domcontentloaded', timeout: 60000});
      result.login = {status: login.status(), url: page.url(), redirected: login.request().redirectChain().length};
    }
    step = 'open the study in the MONAI Label mode';
    await page.goto(`${server}/ohif/monai-label?StudyInstanceUIDs=${study}`, {waitUntil: 'networkidle2', timeout: 60000});
    await waitFor(page, 'three MPR viewports with the CT volume', () => {
      const s = window.services?.cornerstoneViewportService;
      const re = s?.getRenderingEngine?.();
      if (!re) return false;
      const vps = re.getViewports();
      const axial = vps.find((v) => v.id === 'mpr-axial');
      if (vps.length < 3 || !axial || !axial.getImageData?.()) return false;
      const vol = window.cornerstone.cache.getVolume(axial.getVolumeId?.() || '');
      return !!vol && vol.loadStatus?.loaded === true;
    }, null, 60000);
    mark('study_loaded');
    await sleep(500);
    result.mode = await page.evaluate(() => {
      const re = window.services.cornerstoneViewportService.getRenderingEngine();
      return {
        route: location.pathname,
        viewports: re.getViewports().map((v) => v.id).sort(),
        panel: !!document.querySelector('.monaiLabelPanel'),
        server_input: !!document.getElementById('monailabelServerURL'),
        // the series each viewport shows
        viewport_series: Object.fromEntries([...window.services.viewportGridService.getState().viewports.values()].map((v) => [
          v.viewportId, v.displaySetInstanceUIDs.map((uid) => window.services.displaySetService.getDisplaySetByUID(uid)?.SeriesInstanceUID)])),
      };
    });
    result.series_list_before = await seriesList(page);
    await shot(page, '01-loaded');
    // the "investigational use only" banner covers the bottom of the viewports
    await clickText(page, 'button', 'Confirm and Hide', false);

    // maximise the axial viewport (double-click, OHIF's one-up toggle)
    step = 'maximise the axial viewport';
    let rect = await viewportRect(page, 'mpr-axial');
    await page.mouse.click(rect.x + rect.width / 2, rect.y + rect.height / 2, {count: 2, clickCount: 2});
    await sleep(1500);
    await waitFor(page, 'axial viewport maximised', () => {
      const vp = window.services.cornerstoneViewportService.getCornerstoneViewport('mpr-axial');
      return vp && vp.getImageData?.() && vp.element.getBoundingClientRect().width > 700;
    }, null, 15000).catch((e) => { result.warnings = [...(result.warnings || []), String(e.message)]; });
    mark('maximised');

    // ---- 2. connect the panel ----------------------------------------------------------------------
    step = 'connect the MONAI Label panel to the server';
    const input = await page.waitForSelector('#monailabelServerURL', {timeout: 20000});
    await input.click({clickCount: 3});
    await input.evaluate((el) => { el.select(); });
    await page.keyboard.press('Backspace');
    await input.type(`${server}/`);
    result.typed_url = await input.evaluate((el) => el.value);
    await shot(page, '02-typed');
    const infoResponse = page.waitForResponse((r) => r.url().startsWith(`${server}/info/`), {timeout: 30000});
    // a real mouse click: the input loses focus first, which is when the panel takes the new URL
    const connect = await page.evaluateHandle(() => document.getElementById('monailabelServerURL').closest('tr').querySelector('button'));
    await connect.click();
    const info = await infoResponse;
    result.info_status = info.status();
    await waitFor(page, 'the Point Prompts tab', () => [...document.querySelectorAll('label.tab-label')].some((l) => l.textContent === 'Point Prompts'), null, 20000);
    mark('connected');

    // ---- 3. a point on the liver -------------------------------------------------------------------
    step = 'scroll the axial viewport to the slice of the click';
    rect = await viewportRect(page, 'mpr-axial');
    const centre = [rect.x + rect.width / 2, rect.y + rect.height / 2];
    await page.mouse.move(...centre);
    let state = await axialState(page, click);
    // one wheel step to learn which way and how far a step goes, then the rest, then correct
    await page.mouse.wheel({deltaY: 100});
    await sleep(150);
    let next = await axialState(page, click);
    const perStep = state.distance_mm - next.distance_mm;
    state = next;
    if (Math.abs(perStep) < 1e-3) throw new Error('the mouse wheel does not scroll the axial viewport');
    for (let tries = 0; tries < 4 && Math.abs(state.distance_mm) > state.spacing[2] / 2; tries++) {
      const steps = Math.round(state.distance_mm / perStep);
      for (let s = 0; s < Math.abs(steps); s++) {
        await page.mouse.wheel({deltaY: steps > 0 ? 100 : -100});
        await sleep(40);
      }
      await sleep(300);
      state = await axialState(page, click);
    }
    result.axial_before_click = state;
    if (Math.abs(state.distance_mm) > state.spacing[2] / 2) throw new Error(`the wheel did not reach slice ${click[2]}: ${JSON.stringify(state)}`);
    mark('scrolled');

    step = 'choose Point Prompts and the liver';
    await clickText(page, 'label.tab-label', 'Point Prompts');
    await sleep(500);
    const liverRow = await page.evaluateHandle((name) => [...document.querySelectorAll('tr.clickable-row')].find((tr) => tr.innerText.trim() === name), SEGMENT);
    if (!liverRow.asElement()) throw new Error(`no "${SEGMENT}" row in the Point Prompts tab`);
    await liverRow.asElement().click();
    await sleep(500);
    result.probe = await page.evaluate(() => {
      const tg = window.services.toolGroupService.getToolGroupForViewport('mpr-axial');
      return {tool_group: tg.id, active_primary_tool: tg.getActivePrimaryMouseButtonTool()};
    });
    rect = await viewportRect(page, 'mpr-axial');
    result.axial_rect = rect;
    result.projection = await page.evaluate((k) => {
      // page pixels of voxel corners on slice k: screenshot (x, y) = origin + i * di + j * dj
      const vp = window.services.cornerstoneViewportService.getCornerstoneViewport('mpr-axial');
      const {imageData} = vp.getImageData();
      const r = vp.element.getBoundingClientRect();
      const at = (ijk) => { const c = vp.worldToCanvas(imageData.indexToWorld(ijk)); return [c[0] + r.x, c[1] + r.y]; };
      const o = at([0, 0, k]), a = at([100, 0, k]), b = at([0, 100, k]);
      return {origin: o, di: [(a[0] - o[0]) / 100, (a[1] - o[1]) / 100], dj: [(b[0] - o[0]) / 100, (b[1] - o[1]) / 100],
              dimensions: Array.from(imageData.getDimensions())};
    }, click[2]);
    await shot(page, '03-before-click');
    await shot(page, '03-before-click-axial', rect);
    mark('before_click');

    step = 'click the liver';
    // mouse events land on whole CSS pixels: take the pixel nearest the voxel's centre that the
    // viewport maps back to that voxel
    const at = await page.evaluate((ijk) => {
      const vp = window.services.cornerstoneViewportService.getCornerstoneViewport('mpr-axial');
      const {imageData} = vp.getImageData();
      const r = vp.element.getBoundingClientRect();
      const c = vp.worldToCanvas(imageData.indexToWorld(ijk));
      const cx = c[0] + r.left, cy = c[1] + r.top;
      const candidates = [];
      for (let dx = -2; dx <= 2; dx++) {
        for (let dy = -2; dy <= 2; dy++) {
          const px = Math.round(cx) + dx, py = Math.round(cy) + dy;
          const idx = imageData.worldToIndex(vp.canvasToWorld([px - r.left, py - r.top])).map(Math.round);
          if (idx[0] === ijk[0] && idx[1] === ijk[1] && idx[2] === ijk[2]) candidates.push([Math.hypot(px - cx, py - cy), px, py]);
        }
      }
      candidates.sort((a, b) => a[0] - b[0]);
      return candidates.length ? candidates[0].slice(1) : [cx, cy];
    }, click);
    result.click_page_xy = at;
    await page.mouse.click(...at);
    await sleep(500);
    result.probe_points = await page.evaluate(() => {
      const vp = window.services.cornerstoneViewportService.getCornerstoneViewport('mpr-axial');
      const {imageData} = vp.getImageData();
      const all = window.cornerstoneTools.annotation.state.getAllAnnotations().filter((a) => a.metadata.toolName === 'ProbeMONAILabel');
      return all.map((a) => Array.from(imageData.worldToIndex(a.data.handles.points[0])).map(Math.round));
    });
    await shot(page, '04-clicked');
    await shot(page, '04-clicked-axial', rect);
    mark('clicked');

    step = `run ${MODEL} from the Point Prompts tab`;
    const inferResponse = page.waitForResponse((r) => r.url().startsWith(`${server}/infer/`) && r.request().method() === 'POST', {timeout: 120000});
    const run = await page.$('button[title="Run PointPrompts"]');
    if (!run) throw new Error('no Run button in the Point Prompts tab');
    await run.click();
    const inferStarted = Date.now();
    const infer = await inferResponse;
    result.infer = {url: infer.url(), status: infer.status(), seconds: +((Date.now() - inferStarted) / 1000).toFixed(1),
                    content_type: infer.headers()['content-type'], bytes: (await infer.buffer()).length,
                    params: paramsOf(infer.request().postData() || '')};
    mark('inferred');
    step = 'the answer in the viewer\'s labelmap';
    await waitFor(page, 'labelmap voxels from the answer', () => {
      const v = window.services.segmentationService.getLabelmapVolume('1');
      const data = v?.voxelManager?.getCompleteScalarDataArray();
      return !!data && data.some((x) => x !== 0);
    }, null, 30000);
    await sleep(1500); // a render or two
    result.labelmap = await page.evaluate((name, k) => {
      const seg = window.services.segmentationService.getSegmentation('1');
      const segments = Object.values(seg.segments || seg.config?.segments || {});
      const liver = segments.find((s) => s.label === name);
      const v = window.services.segmentationService.getLabelmapVolume('1');
      const data = v.voxelManager.getCompleteScalarDataArray();
      const [nx, ny, nz] = v.dimensions;
      const counts = {};
      let onSlice = 0, indexSum = 0;
      for (let i = 0; i < data.length; i++) {
        if (data[i]) {
          counts[data[i]] = (counts[data[i]] || 0) + 1;
          indexSum += i; // exact: below 2^53 for any label of a CT
          if (Math.floor(i / (nx * ny)) === k) onSlice++;
        }
      }
      const vp = window.services.cornerstoneViewportService.getCornerstoneViewport('mpr-axial');
      const color = window.cornerstoneTools.segmentation.config.color.getSegmentIndexColor(vp.id, '1', liver.segmentIndex);
      return {segment_index: liver.segmentIndex, color: color && Array.from(color), dimensions: [nx, ny, nz], counts,
              voxels_on_click_slice: onSlice, index_sum: indexSum};
    }, SEGMENT, click[2]);
    await shot(page, '05-after-infer');
    await shot(page, '05-after-infer-axial', rect);
    mark('overlay');

    // ---- 4. save what the viewer holds ------------------------------------------------------------
    step = 'save the viewer\'s labelmap as the final label (PUT /datastore/label from the page)';
    result.save = await page.evaluate(saveLabel, server, series, result.labelmap.segment_index, SEGMENT);
    if (result.save.error) throw new Error(result.save.error);
    mark('saved');

    // ---- 5. the study again: the SEG in the series list -------------------------------------------
    step = 'reload the study and find the SEG in the series list';
    await page.goto(`${server}/ohif/monai-label?StudyInstanceUIDs=${study}`, {waitUntil: 'networkidle2', timeout: 60000});
    await waitFor(page, 'a SEG series in the study browser', () => {
      const items = [...document.querySelectorAll('[data-cy^="study-browser-thumbnail"]')];
      return items.some((e) => /\bSEG\b/.test(e.innerText));
    }, null, 30000);
    await sleep(1000);
    result.series_list_after = await seriesList(page);
    result.display_sets_after = await page.evaluate(() => window.services.displaySetService.getActiveDisplaySets()
      .map((d) => ({modality: d.Modality, series: d.SeriesInstanceUID, description: d.SeriesDescription || '',
                    referenced_series: d.referencedSeriesInstanceUID || d.instance?.ReferencedSeriesSequence?.[0]?.SeriesInstanceUID || null})));
    await shot(page, '06-reloaded-series-list');
    mark('reloaded');
  } catch (e) {
    if (page) await shot(page, 'error').catch(() => {});
    throw e;
  } finally {
    await browser.close();
    fs.rmSync(userDataDir, {recursive: true, force: true});
  }
}

// Runs in the page. The label is the viewer's labelmap (the segment `segmentIndex` as 1), in its
// voxel order, which is the image's as stored (the panel copied the server's answer into it
// unchanged); the NIfTI header is the image's own (GET /datastore/image), so the label lies on the
// image grid by construction.
async function saveLabel(server, series, segmentIndex, name) {
  const q = encodeURIComponent(series);
  const r = await fetch(`${server}/datastore/image?image=${q}`);
  if (!r.ok) return {error: `GET /datastore/image answered ${r.status}`};
  let bytes = new Uint8Array(await r.arrayBuffer());
  const gunzip = async (b) => new Uint8Array(await new Response(new Blob([b]).stream().pipeThrough(new DecompressionStream('gzip'))).arrayBuffer());
  if (bytes[0] === 0x1f && bytes[1] === 0x8b) bytes = await gunzip(bytes);
  const dv = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const le = dv.getInt32(0, true) === 348;
  if (!le && dv.getInt32(0, false) !== 348) return {error: 'the image is not NIfTI-1'};
  const ndim = dv.getInt16(40, le);
  const dims = [];
  for (let d = 1; d <= ndim; d++) dims.push(dv.getInt16(40 + 2 * d, le));
  const volume = window.services.segmentationService.getLabelmapVolume('1');
  const data = volume.voxelManager.getCompleteScalarDataArray();
  const expected = dims.reduce((a, b) => a * b, 1);
  if (data.length !== expected) return {error: `labelmap has ${data.length} voxels, the image ${expected} (${dims})`};
  const header = bytes.slice(0, 352);
  const hv = new DataView(header.buffer);
  hv.setInt16(70, 2, le); // datatype: uint8
  hv.setInt16(72, 8, le); // bitpix
  hv.setFloat32(108, 352, le); // vox_offset
  hv.setFloat32(112, 1, le); // scl_slope
  hv.setFloat32(116, 0, le); // scl_inter
  hv.setFloat32(124, 1, le); // cal_max
  hv.setFloat32(128, 0, le); // cal_min
  header.fill(0, 348, 352); // no extensions
  const label = new Uint8Array(expected);
  let voxels = 0, indexSum = 0;
  for (let i = 0; i < expected; i++) {
    if (data[i] === segmentIndex) { label[i] = 1; voxels++; indexSum += i; }
  }
  const gz = await new Response(new Blob([header, label]).stream().pipeThrough(new CompressionStream('gzip'))).blob();
  const form = new FormData();
  // OHIF's infer requests carry no client_id: the server filed them under "default"
  form.append('params', JSON.stringify({label_info: [{name, idx: 1}], client_id: 'default'}));
  form.append('label', gz, 'label.nii.gz');
  const put = await fetch(`${server}/datastore/label?image=${q}&tag=final`, {method: 'PUT', body: form});
  const text = await put.text();
  let body;
  try { body = JSON.parse(text); } catch (e) { body = text.slice(0, 500); }
  return {status: put.status, response: body, voxels, index_sum: indexSum, image_dims: dims, bytes: gz.size};
}

function paramsOf(body) {
  // the multipart form's "params" field
  const m = body.match(/name="params"\r?\n\r?\n([\s\S]*?)\r?\n--/);
  try { return m ? JSON.parse(m[1]) : null; } catch (e) { return m[1]; }
}

// the study browser's entries (thumbnails and list rows), as text: "CT CT Body 3.0 S:0 20"
async function seriesList(page) {
  return page.evaluate(() => [...document.querySelectorAll('[data-cy^="study-browser-thumbnail"]')]
    .map((e) => e.innerText.replace(/\s+/g, ' ').trim()));
}

// a real mouse click on the element with this text
async function clickText(page, selector, text, required = true) {
  const handle = await page.evaluateHandle((selector, text) =>
    [...document.querySelectorAll(selector)].find((e) => e.textContent.trim() === text) || null, selector, text);
  const el = handle.asElement();
  if (!el) {
    if (required) throw new Error(`no ${selector} "${text}" on the page`);
    return false;
  }
  await el.click();
  return true;
}

main().then(() => {
  mark('total');
  result.ok = true;
}).catch(async (e) => {
  result.ok = false;
  result.error = String(e && e.stack || e);
  result.step = step;
}).finally(() => {
  fs.writeFileSync(path.join(outDir, 'result.json'), JSON.stringify(result, null, 1));
  console.log(JSON.stringify(result));
  process.exit(result.ok ? 0 : 1);
});
