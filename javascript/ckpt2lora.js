// ckpt2lora: the WebUI side of the tab. One global, `ckpt2lora`.
// Uses the WebUI's own helpers when present: gradioApp(), randomId(), requestProgress(),
// updateInput(), switch_to_txt2img(), selectCheckpoint(); element ids of A1111 1.10,
// Forge and Forge Neo: #txt2img_prompt textarea, #txt2img_lora_extra_refresh_internal,
// and for Compare #txt2img_neg_prompt, #txt2img_seed, #txt2img_steps, #txt2img_width,
// #txt2img_height, #txt2img_cfg_scale, #txt2img_sampling, #txt2img_scheduler.
var ckpt2lora = (function () {
    "use strict";

    function app() {
        return typeof gradioApp === "function" ? gradioApp() : document;
    }

    function fire(el) {
        if (typeof updateInput === "function") {
            updateInput(el);
        } else {
            el.dispatchEvent(new Event("input", {bubbles: true}));
        }
    }

    function escapeRegExp(text) {
        return text.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");
    }

    // The prompt with <lora:NAME:1> appended; unchanged if a tag for NAME is already there
    // (sending twice must not remove it, unlike a click on a Lora card).
    function withLoraTag(prompt, name) {
        var existing = new RegExp("<lora:" + escapeRegExp(name) + "(:[^>]*)?>", "i");
        if (existing.test(prompt)) {
            return prompt;
        }
        var tag = "<lora:" + name + ":1>";
        if (!prompt || /^\s*$/.test(prompt)) {
            return tag;
        }
        return /[\s,]$/.test(prompt) ? prompt + tag : prompt + " " + tag;
    }

    function refreshLoraCards() {
        var button = app().querySelector("#txt2img_lora_extra_refresh_internal");
        if (button) {
            button.dispatchEvent(new Event("click"));
        }
    }

    // "Send to txt2img": append the tag, switch to txt2img, refresh the Lora cards, and
    // (ticked by default) load the base model: the LoRA is meant for the base; on the
    // variant it would add the change twice.
    function sendToTxt2img(name, baseTitle, selectBase) {
        if (!name) {
            return [];
        }
        var textarea = app().querySelector("#txt2img_prompt textarea");
        if (!textarea) {
            return [];
        }
        textarea.value = withLoraTag(textarea.value, name);
        fire(textarea);
        if (typeof switch_to_txt2img === "function") {
            switch_to_txt2img();
        }
        refreshLoraCards();
        if (selectBase) {
            selectCheckpoint(baseTitle);
        }
        return [];
    }

    function fieldValue(selector) {
        var el = app().querySelector(selector);
        return el ? el.value : null;
    }

    // What Compare generates: the txt2img tab's current prompt, seed and size (numbers as
    // the page shows them; missing fields take the tab's defaults on the Python side).
    function txt2imgSettings() {
        return {
            prompt: fieldValue("#txt2img_prompt textarea"),
            negative_prompt: fieldValue("#txt2img_neg_prompt textarea"),
            seed: fieldValue("#txt2img_seed input"),
            steps: fieldValue("#txt2img_steps input[type=number]"),
            width: fieldValue("#txt2img_width input[type=number]"),
            height: fieldValue("#txt2img_height input[type=number]"),
            cfg_scale: fieldValue("#txt2img_cfg_scale input[type=number]"),
            sampler_name: fieldValue("#txt2img_sampling input"),
            scheduler: fieldValue("#txt2img_scheduler input"),
        };
    }

    // "Use this checkpoint": the WebUI's own checkpoint switch (as its checkpoint cards do).
    function selectCheckpoint(title) {
        if (title && typeof window.selectCheckpoint === "function") {
            window.selectCheckpoint(title);
        }
        return [];
    }

    // Extract: a task id for the WebUI's progress bar (polls /internal/progress), shown
    // above the tab's status area. Returns the inputs with the id as the first one.
    function submit(args, nInputs, statusId) {
        var res = Array.prototype.slice.call(args, 0, nInputs);
        var id = typeof randomId === "function" ? randomId() : "task(" + Math.random().toString(36).slice(2) + ")";
        res[0] = id;
        var status = app().querySelector("#" + (statusId || "ckpt2lora_status"));
        if (typeof requestProgress === "function" && status) {
            requestProgress(id, status, null, function () {});
        }
        return res;
    }

    // Compare: a task id (progress above the compare status) and the txt2img settings as
    // JSON in the second input.
    function compare(args, nInputs) {
        var res = submit(args, nInputs, "ckpt2lora_compare_status");
        res[1] = JSON.stringify(txt2imgSettings());
        return res;
    }

    return {
        withLoraTag: withLoraTag,
        sendToTxt2img: sendToTxt2img,
        selectCheckpoint: selectCheckpoint,
        submit: submit,
        txt2imgSettings: txt2imgSettings,
        compare: compare,
    };
})();
