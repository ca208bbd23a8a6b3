"""The codes BoneBridge's SR uses: standard ones (LOINC, SNOMED CT, UCUM) and the local scheme ``99BB``.

Coding choices, and why:

* Bone age uses LOINC 85151-9 "XR Bone age" (a quantitative observation, reported in months here).
* Anatomy uses the SNOMED CT codes of the upper-extremity regions (hand 85562004, wrist 74670003,
  elbow 127949000, forearm 14975008, humerus 85050009, shoulder 16982005, finger 7569003) and, for the rest
  of the vocabulary, the codes pydicom's SCT dictionary gives (knee 72696002, lower leg 30021000, ankle
  joint 70258002, foot 56459004, hip 29836001, pelvis 816092008, femur 71341001, chest 816094009, spine
  421060004, skull 89546000, abdomen 818981001); "other" has no code and appears only as text. The anatomy
  model's top two, the tags' answer and which decided are TEXT items (99BB ANATOMY-MODEL-1/-2, ANATOMY-TAGS,
  ANATOMY-DECIDED-BY); their disagreement is a CODE item (99BB ANATOMY-DISAGREE, SCT Yes/No). Where an anatomy
  cascade's fallback answered, why is a TEXT item (99BB ANATOMY-FALLBACK).
* A fracture model's decision is also coded as the finding SNOMED CT 125605004 "Fracture of bone" with the
  value Present (52101004) or Absent (272519000): the disorder concept SNOMED CT files every fracture under
  (the site is the group's finding site), so a query for fractures finds it; "Abnormal" alone does not say what.
* Decision, sex and yes/no values are standard SNOMED CT qualifiers. The *concept names* for a model's
  abnormality probability, its threshold, a predicted sex, provenance and the not-processed reason have
  no standard code, so they use the private coding scheme ``99BB`` (PS3.16 8.2: designators starting
  with "99" are local), declared in the Coding Scheme Identification Sequence.
* TID 1500 has no slot for model provenance or free text. Model name/version/sha256/task, the route and
  sources of anatomy and sex are TEXT items appended to the measurement group (Comprehensive SR allows
  them); the numeric results also carry a TID 4019 Algorithm Identification of the model that made them.
* The device observer (TID 1004) has no software-version row, so the BoneBridge version and the model
  versions go into the General Equipment module's Software Versions.
* The report is COMPLETE but PRELIMINARY and UNVERIFIED: it is machine output for a radiologist to
  confirm, not a signed report.
"""

from __future__ import annotations

from highdicom.sr import CodedConcept
from pydicom.sr.codedict import codes

LOCAL_SCHEME = "99BB"


def local_code(value: str, meaning: str) -> CodedConcept:
    return CodedConcept(value=value, scheme_designator=LOCAL_SCHEME, meaning=meaning)


CODE_BONE_AGE = CodedConcept(value="85151-9", scheme_designator="LN", meaning="Bone age")
CODE_ABNORMALITY_PROBABILITY = local_code("ABN-PROB", "Abnormality probability")
CODE_ABNORMALITY_THRESHOLD = local_code("ABN-THRESH", "Abnormality decision threshold")
CODE_ABNORMALITY_DECISION = local_code("ABN-DECISION", "Abnormality decision")
CODE_PREDICTED_SEX = local_code("SEX-PRED", "Predicted sex")
CODE_PREDICTED_SEX_PROBABILITY = local_code("SEX-PROB", "Predicted sex probability")
CODE_SEX_SOURCE = local_code("SEX-SOURCE", "Sex source")
CODE_SEX_MISMATCH = local_code("SEX-MISMATCH", "Predicted sex differs from DICOM sex")
CODE_HAND_SIDE = local_code("HAND-SIDE", "Hand side bone age was read on")
CODE_ANATOMY = local_code("ANATOMY", "Anatomy")
CODE_MAP_PEAK_PROBABILITY = local_code("MAP-PEAK-PROB", "Localisation map peak probability")
CODE_ANATOMY_SOURCE = local_code("ANATOMY-SOURCE", "Anatomy source")
CODE_ANATOMY_PROBABILITY = local_code("ANATOMY-PROB", "Anatomy probability")
CODE_ANATOMY_MODEL_TOP1 = local_code("ANATOMY-MODEL-1", "Anatomy model first choice")
CODE_ANATOMY_MODEL_TOP2 = local_code("ANATOMY-MODEL-2", "Anatomy model second choice")
CODE_ANATOMY_TAGS = local_code("ANATOMY-TAGS", "Anatomy from DICOM tags")
CODE_ANATOMY_DECIDED_BY = local_code("ANATOMY-DECIDED-BY", "Anatomy decided by")
CODE_ANATOMY_DISAGREEMENT = local_code("ANATOMY-DISAGREE", "Anatomy model disagrees with DICOM tags")
#: An anatomy cascade's fallback answered: which model was out of distribution, so that the second one spoke.
CODE_ANATOMY_FALLBACK = local_code("ANATOMY-FALLBACK", "Anatomy model fallback")
CODE_ROUTE = local_code("ROUTE", "BoneBridge route")
CODE_MODEL = local_code("MODEL", "Model name")
CODE_MODEL_VERSION = local_code("MODEL-VERSION", "Model version")
CODE_MODEL_SHA256 = local_code("MODEL-SHA256", "Model weights SHA-256")
CODE_MODEL_TASK = local_code("MODEL-TASK", "Model task")
CODE_NOT_PROCESSED = local_code("NOT-PROCESSED", "Not processed")
CODE_UNREADABLE_ATTRIBUTE = local_code("UNREADABLE-ATTR", "Unreadable source attribute")
CODE_RADIOGRAPHY = CodedConcept(value="363680008", scheme_designator="SCT", meaning="Radiographic imaging procedure")

UNIT_PROBABILITY = CodedConcept(value="{probability}", scheme_designator="UCUM", meaning="probability")
UNIT_MONTHS = CodedConcept.from_code(codes.UCUM.Month)

ANATOMY_CODES: dict[str, CodedConcept] = {
    "hand": CodedConcept("85562004", "SCT", "Hand"),
    "wrist": CodedConcept("74670003", "SCT", "Wrist joint"),
    "elbow": CodedConcept("127949000", "SCT", "Elbow region structure"),
    "forearm": CodedConcept("14975008", "SCT", "Forearm"),
    "humerus": CodedConcept("85050009", "SCT", "Humerus"),
    "shoulder": CodedConcept("16982005", "SCT", "Shoulder"),
    "finger": CodedConcept("7569003", "SCT", "Finger"),
    # The rest of the vocabulary: the codes pydicom's SCT dictionary (from DICOM PS3.16) names for these regions.
    "chest": CodedConcept.from_code(codes.SCT.Chest),
    "pelvis": CodedConcept.from_code(codes.SCT.Pelvis),
    "hip": CodedConcept.from_code(codes.SCT.Hip),
    "femur": CodedConcept.from_code(codes.SCT.Femur),
    "knee": CodedConcept.from_code(codes.SCT.Knee),
    "leg": CodedConcept.from_code(codes.SCT.LowerLeg),
    "ankle": CodedConcept.from_code(codes.SCT.AnkleJoint),
    "foot": CodedConcept.from_code(codes.SCT.Foot),
    "spine": CodedConcept.from_code(codes.SCT.Spine),
    "skull": CodedConcept.from_code(codes.SCT.Skull),
    "abdomen": CodedConcept.from_code(codes.SCT.Abdomen),
}
"""SNOMED CT finding sites for the anatomy names; "other" deliberately has none."""

CODE_FRACTURE = CodedConcept("125605004", "SCT", "Fracture of bone")
PRESENCE_CODES = {"present": CodedConcept.from_code(codes.SCT.Present),
                   "absent": CodedConcept.from_code(codes.SCT.Absent)}
DECISION_CODES = {
    "abnormal": CodedConcept.from_code(codes.SCT.Abnormal),
    "normal": CodedConcept.from_code(codes.SCT.Normal),
}
SEX_CODES = {
    "M": CodedConcept("248153007", "SCT", "Male"),
    "F": CodedConcept("248152002", "SCT", "Female"),
}
YES_NO_CODES = {"yes": CodedConcept.from_code(codes.SCT.Yes), "no": CodedConcept.from_code(codes.SCT.No)}

# Findings keys handled explicitly; anything else is still reported (NUM or TEXT) under a local code.
KNOWN_FINDINGS = frozenset(
    {
        "bone_age_months",
        "abnormality_probability",
        "abnormality_threshold",
        "abnormality_decision",
        "fracture",
        "predicted_sex",
        "predicted_sex_probability",
        "sex_source",
        "sex_mismatch",
        "hand_side",
    }
)
# Which model task produced which finding (task names normalised: lower case, "-" -> "_").
FINDING_TASK = {
    "bone_age_months": ("bone_age", "boneage"),
    "abnormality_probability": ("abnormality",),
    "abnormality_threshold": ("abnormality",),
    "predicted_sex_probability": ("sex",),
    "anatomy_probability": ("anatomy",),
}
