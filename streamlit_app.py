"""The web page: upload photos, see Car or Bike with its confidence (or "neither a car nor a
bike?" for a photo unlike the training photos), and where the model looked.

    streamlit run streamlit_app.py        # then open http://localhost:8501

It talks to the prediction service over HTTP (URL from $PREDICT_URL, default
http://localhost:9696) and never loads the model itself.
"""

from __future__ import annotations

import base64

import altair as alt
import pandas as pd
import streamlit as st

from vehicle_classifier.client import PredictionClient, ServiceError, service_url

UPLOAD_TYPES = ["jpg", "jpeg", "png", "webp"]
UNSURE_BELOW = 0.6  # a two-class softmax this close to 50/50 is a guess; say so
NEITHER = "Neither a car nor a bike?"  # the headline for a photo out of distribution


@st.cache_data(ttl=15, show_spinner=False)
def service_status(url: str) -> dict:
    """Readiness and model metadata, briefly cached: every click reruns the page, and a down
    service should not cost a timeout per click. Failures are cached too (as a message)."""
    try:
        client = PredictionClient(url)
        ready = client.ready()
        metadata = client.metadata() if ready.get("ready") else None
    except ServiceError as exc:
        return {"error": str(exc)}
    return {"ready": ready, "metadata": metadata}


@st.cache_data(ttl=3600, max_entries=256, show_spinner=False)
def predict(url: str, model_version: str | None, data: bytes, filename: str, attention: bool) -> dict:
    """One photo's answer. Cached so that toggling an overlay does not ask again for every photo;
    the model version is part of the key, so a new model gets fresh answers. Errors are not
    cached: the next rerun asks again."""
    return PredictionClient(url).predict(data, filename=filename, attention=attention)


def show_sidebar(url: str, status: dict) -> None:
    with st.sidebar:
        st.header("Prediction service")
        st.caption(url)
        if "error" in status:
            st.error(f"Not available: {status['error']}")
        elif not status["ready"].get("ready"):
            reason = status["ready"].get("error") or status["ready"].get("reason") or "the model is not loaded yet"
            st.warning(f"Not ready: {reason}")
        else:
            st.success("Ready")
        if st.button("Check again"):
            service_status.clear()
            st.rerun()

        metadata = status.get("metadata")
        if metadata:
            st.header("Model")
            backbone = metadata.get("backbone") or {}
            test = (metadata.get("metrics") or {}).get("test") or {}
            lines = [f"**Classes:** {', '.join(metadata.get('class_names', []))}"]
            if backbone:
                lines.append(f"**Backbone:** {backbone.get('name', '?')} (`{backbone.get('architecture', '?')}`)")
            if "accuracy" in test:
                auc = f", ROC AUC {test['roc_auc']:.3f}" if "roc_auc" in test else ""
                lines.append(f"**Test accuracy:** {test['accuracy']:.1%}{auc}")
            lines.append(f"**Version:** `{metadata.get('model_version', '?')}`"
                         + (f", trained {metadata['created_at'][:10]}" if metadata.get("created_at") else ""))
            st.markdown("  \n".join(lines))


def show_answer(answer: dict) -> None:
    """The headline: the label and its confidence, unless the photo is unlike every training
    photo, where a confident label would mislead."""
    if answer.get("in_distribution") is False:
        st.subheader(NEITHER)
        st.caption(f"This photo lies far from every photo the model was trained on (distance "
                   f"{answer['ood_score']:.2f}), so its answer means little: the closer of its classes is "
                   f"{answer['label']}, at {answer['confidence']:.1%}.")
        return
    st.subheader(f"{answer['label']} · {answer['confidence']:.1%}")
    if answer["confidence"] < UNSURE_BELOW:
        st.caption("The model is unsure about this one.")


def show_prediction(answer: dict, image: bytes, filename: str, key: str, attention_maps: bool) -> None:
    """One photo: the image (or its attention overlay), the answer and the probability chart."""
    left, right = st.columns(2)
    with right:
        show_answer(answer)
        st.altair_chart(probability_chart(answer), width="stretch", height=50 + 36 * len(answer["probabilities"]))
        show_attention = False
        if attention_maps:
            show_attention = st.toggle("Show where the model looked", key=f"attention-{key}")
        else:
            st.caption("Attention maps are not available for this backbone (it has no [CLS] self-attention).")
    with left:
        if show_attention and "attention_png" in answer:
            st.image(base64.b64decode(answer["attention_png"]), caption=f"{filename}: attention overlay",
                     width="stretch")
            st.caption("Brighter means more of the model's attention, over the centre crop it sees.")
        else:
            st.image(image, caption=filename, width="stretch")


def probability_chart(answer: dict) -> alt.Chart:
    """Bars on a fixed 0-100 % scale, the predicted class highlighted: 55 % should look like a guess."""
    data = pd.DataFrame({"class": list(answer["probabilities"]),
                         "probability": [100 * p for p in answer["probabilities"].values()]})
    return alt.Chart(data).mark_bar().encode(
        x=alt.X("probability:Q", title="probability (%)", scale=alt.Scale(domain=[0, 100])),
        y=alt.Y("class:N", title=None, sort=None),
        color=alt.condition(alt.datum["class"] == answer["label"], alt.value("#e4572e"), alt.value("#9aa5b1")),
        tooltip=["class", alt.Tooltip("probability:Q", format=".1f")],
    )


def main() -> None:
    st.set_page_config(page_title="Car or Bike?", page_icon="🚗", layout="wide")
    url = service_url()
    status = service_status(url)
    show_sidebar(url, status)

    st.title("Car or Bike?")
    st.write("Upload photos of cars or bikes; a frozen pretrained backbone with a small trained head "
             "tells which is which, and how sure it is. A photo unlike any it was trained on gets "
             f"“{NEITHER.lower()}” instead of a label.")
    uploads = st.file_uploader("Photos", type=UPLOAD_TYPES, accept_multiple_files=True)
    if not uploads:
        st.info("Drop one or more photos (JPG, PNG or WebP) above.")
        return

    model_version = (status.get("ready") or {}).get("model_version")
    # Services older than attention_maps in /metadata had them for every (ViT) backbone.
    attention_maps = (status.get("metadata") or {}).get("attention_maps", True)
    for upload in uploads:
        with st.container(border=True):
            data = upload.getvalue()
            key = upload.file_id
            attention = bool(st.session_state.get(f"attention-{key}"))
            try:
                with st.spinner(f"Asking about {upload.name}…"):
                    answer = predict(url, model_version, data, upload.name, attention)
            except ServiceError as exc:
                st.error(f"{upload.name}: {exc}")  # no preview: the file may not be an image at all
                if exc.unavailable:  # the other photos would wait and fail the same way
                    service_status.clear()
                    st.warning("Start the service, or check PREDICT_URL, then press “Check again” in the sidebar.")
                    return
                continue
            show_prediction(answer, data, upload.name, key, attention_maps)


main()
